"""The SUPERB keyword-spotting label set, in SUPERB KS order."""
from __future__ import annotations

from common.errors import MqfedError

KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
KS_LABELS: tuple[str, ...] = KEYWORDS + (SILENCE, UNKNOWN)

# Speech Commands v0.01's auxiliary words: the source of `_unknown_`.
AUXILIARY_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
    "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
)

LABEL2ID: dict[str, int] = {name: i for i, name in enumerate(KS_LABELS)}
ID2LABEL: dict[int, str] = dict(enumerate(KS_LABELS))


class UnknownLabelError(MqfedError, ValueError):
    """A label outside the twelve SUPERB KS labels."""


def label_id(name: str) -> int:
    """The SUPERB KS id of `name`; raises UnknownLabelError naming it and the known labels."""
    try:
        return LABEL2ID[name]
    except KeyError:
        raise UnknownLabelError(f"unknown label {name!r}: expected one of {', '.join(KS_LABELS)}") from None
