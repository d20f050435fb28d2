"""Worker shards of a data set, reproducible from their spec string alone.

Spec grammar: ``KIND:RANK/WORLD[:key=value...]``, ranks 1-based like the OpenFL envoys'
``rank_worldsize: 1, 2`` (rank 1 of 2 is the first half):

| spec                          | shard                                                                 |
|-------------------------------|-----------------------------------------------------------------------|
| ``all``                       | the whole split                                                       |
| ``iid:1/4``                   | rows of a seeded permutation, every 4th starting at the first          |
| ``dirichlet:1/4:alpha=0.5``   | label skew: each label's rows split over the world by Dirichlet(alpha) |
| ``speaker:1/4``               | every row of the speakers dealt to rank 1 (speakers shuffled, dealt round-robin) |

Every kind takes ``seed=N`` (default 0). All ranks of one world with one seed partition the split: every
row is in exactly one shard. An empty shard raises DataError naming the spec.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from datasets import Dataset

from common.data.dataset import DataError

KINDS = ("all", "iid", "dirichlet", "speaker")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    kind: str = "all"
    rank: int = 1
    world: int = 1
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"shard kind {self.kind!r} unknown; known: {', '.join(KINDS)}")
        if not (isinstance(self.world, int) and self.world >= 1 and isinstance(self.rank, int) and 1 <= self.rank <= self.world):
            raise DataError(f"shard rank/world {self.rank}/{self.world}: need 1 <= rank <= world")
        if not self.alpha > 0:
            raise DataError(f"shard alpha must be > 0, got {self.alpha}")

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        """Parse ``KIND:RANK/WORLD[:key=value...]``; raises ValueError naming the bad part."""
        parts = [p.strip() for p in str(text).strip().split(":")]
        if parts == ["all"]:
            return cls()
        if len(parts) < 2 or "/" not in parts[1]:
            raise DataError(f"shard spec {text!r}: expected KIND:RANK/WORLD[:key=value], e.g. iid:1/2")
        rank, _, world = parts[1].partition("/")
        options: dict = {}
        for opt in parts[2:]:
            key, eq, value = opt.partition("=")
            if not eq or key not in ("alpha", "seed"):
                raise DataError(f"shard spec {text!r}: unknown option {opt!r} (known: alpha=, seed=)")
            options[key] = value
        try:
            return cls(parts[0], int(rank), int(world), alpha=float(options.get("alpha", 0.5)),
                       seed=int(options.get("seed", 0)))
        except (TypeError, ValueError) as exc:
            raise DataError(f"shard spec {text!r}: {exc}") from None

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        alpha = f":alpha={self.alpha:g}" if self.kind == "dirichlet" else ""
        return f"{self.kind}:{self.rank}/{self.world}{alpha}:seed={self.seed}"


def shard_indices(labels: np.ndarray, speakers: list[str] | None, spec: ShardSpec) -> np.ndarray:
    """Row indices (sorted) of `spec`'s shard of a split with these labels (and speakers, for ``speaker``)."""
    n = len(labels)
    rng = np.random.default_rng([spec.seed, KINDS.index(spec.kind)])
    r = spec.rank - 1
    if spec.kind == "all":
        return np.arange(n)
    if spec.kind == "iid":
        return np.sort(rng.permutation(n)[r::spec.world])
    if spec.kind == "speaker":
        if speakers is None:
            raise DataError(f"shard {spec}: the data set has no 'speaker' column")
        unique = sorted(set(speakers))
        mine = {unique[i] for i in rng.permutation(len(unique))[r::spec.world]}
        return np.array([i for i, s in enumerate(speakers) if s in mine], dtype=np.int64)
    picked = []
    labels = np.asarray(labels)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(rng.dirichlet([spec.alpha] * spec.world)) * rows.size).astype(int)
        start = cuts[r - 1] if r else 0
        picked.append(rows[start:cuts[r]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def select_shard(ds: Dataset, spec: ShardSpec | str, name: str = "split") -> Dataset:
    """The rows of `ds` in `spec`'s shard; raises DataError when the shard is empty."""
    spec = ShardSpec.parse(spec) if isinstance(spec, str) else spec
    speakers = ds["speaker"] if spec.kind == "speaker" and "speaker" in ds.column_names else None
    labels = np.asarray(ds["label"]) if spec.kind == "dirichlet" else np.zeros(len(ds))
    idx = shard_indices(labels, speakers, spec)
    if idx.size == 0:
        raise DataError(f"shard {spec} of {name} ({len(ds)} rows) is empty")
    return ds.select(idx)
