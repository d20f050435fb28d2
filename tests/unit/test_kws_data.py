"""Keyword-spotting data sets: the synthetic corpus (format, speaker-disjoint splits, determinism, on-disk
cache, the `mqfed-worker data synth` command), Speech Commands v0.01 directories (SUPERB KS protocol),
hub split conversion without torchcodec, and the label set."""
from __future__ import annotations

import ctypes
import dataclasses
import io
import shutil

import numpy as np
import pytest
import soundfile
from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk

from common.data import corpus, speech_commands
from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE, AudioFormatError
from common.data.corpus import SynthSpec
from common.data.dataset import SPLITS, DataError, check_splits, label_counts
from common.data.espeak import Synthesizer, Voice
from common.data.labels import KEYWORDS, KS_LABELS, LABEL2ID, SILENCE, UNKNOWN, UnknownLabelError, label_id
from worker import cli

SUPERB_KS_LABELS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_"]


def _audio(dd: DatasetDict, split: str) -> np.ndarray:
    return np.asarray(dd[split].with_format("numpy")["audio"], dtype=np.float32)


# --- labels -------------------------------------------------------------------------------------------

def test_ks_labels_are_the_twelve_superb_labels_in_order():
    assert list(KS_LABELS) == SUPERB_KS_LABELS
    assert [label_id(name) for name in SUPERB_KS_LABELS] == list(range(12))


def test_label_id_of_an_unknown_label_raises_naming_it():
    with pytest.raises(UnknownLabelError, match="'banana'"):
        label_id("banana")


# --- synthetic corpus -----------------------------------------------------------------------------------

def test_synthetic_corpus_has_three_splits_and_test_unseen_in_ks_format(tiny_corpus):
    assert isinstance(tiny_corpus, DatasetDict) and set(tiny_corpus) == set(SPLITS) | {"test_unseen"}
    check_splits(tiny_corpus)
    for split in (*SPLITS, "test_unseen"):
        ds = tiny_corpus[split]
        assert isinstance(ds.features["label"], ClassLabel)
        assert ds.features["label"].names == SUPERB_KS_LABELS
        assert {"audio", "label", "speaker", "word"} <= set(ds.column_names)
        audio = _audio(tiny_corpus, split)
        assert audio.dtype == np.float32 and audio.shape == (len(ds), CLIP_SAMPLES)
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def test_synthetic_corpus_has_every_class_in_every_split(tiny_corpus, tiny_spec):
    expected = {"train": tiny_spec.per_class, "validation": tiny_spec.eval_per_class, "test": tiny_spec.eval_per_class}
    for split in SPLITS:
        assert label_counts(tiny_corpus[split]) == {name: expected[split] for name in KS_LABELS}


def test_synthetic_corpus_speakers_are_disjoint_between_splits(tiny_corpus):
    speakers = {split: set(tiny_corpus[split]["speaker"]) for split in SPLITS}
    assert all(speakers.values()) and all("" not in s for s in speakers.values())
    assert not speakers["train"] & speakers["test"]
    assert not speakers["train"] & speakers["validation"]
    assert not speakers["validation"] & speakers["test"]


def test_synthetic_corpus_words_match_labels(tiny_corpus):
    for row in tiny_corpus["train"].select_columns(["label", "word"]):
        name = KS_LABELS[row["label"]]
        if name == SILENCE:
            assert row["word"] == ""
        elif name == UNKNOWN:
            assert row["word"] not in KEYWORDS and row["word"]
        else:
            assert row["word"] == name


def test_synthetic_corpus_is_deterministic_in_its_seed(tiny_corpus, tiny_spec):
    again = corpus.generate(tiny_spec, progress=False)
    other = corpus.generate(dataclasses.replace(tiny_spec, seed=tiny_spec.seed + 1), progress=False)
    for split in SPLITS:
        np.testing.assert_array_equal(_audio(again, split), _audio(tiny_corpus, split))
        assert again[split]["speaker"] == tiny_corpus[split]["speaker"]
        assert not np.array_equal(_audio(other, split), _audio(tiny_corpus, split))


def test_speech_synthesis_does_not_depend_on_what_was_spoken_before():
    # espeak-ng keeps state between utterances (pitch flutter, wave generator); each Synthesizer has its own.
    voice = Voice("en-us", "f3")  # a variant with breath noise
    busy = Synthesizer()
    for word in ("seven", "marvin", "dog"):
        busy.speak(word, Voice("en-gb-x-rp", "m3"))
    np.testing.assert_array_equal(Synthesizer().speak("six", voice), Synthesizer().speak("six", voice))


def test_speech_synthesis_noise_does_not_depend_on_the_library_seed():
    # espeak-ng seeds its noise generator with time() at initialisation: two processes started at
    # different seconds must still agree. Stand in for that by re-seeding one synthesizer's library.
    voice = Voice("en-us", "f3")
    reseeded = Synthesizer()
    if hasattr(reseeded._lib, "espeak_ng_SetRandSeed"):
        reseeded._lib.espeak_ng_SetRandSeed(ctypes.c_long(987654321))
    np.testing.assert_array_equal(reseeded.speak("six", voice), Synthesizer().speak("six", voice))


def test_synthetic_corpus_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    spec = SynthSpec(seed=3, per_class=1, eval_per_class=1)
    first = corpus.build(out, spec, progress=False)

    def no_regeneration(*args, **kwargs):
        raise AssertionError("the cached corpus was regenerated")

    monkeypatch.setattr(corpus, "generate", no_regeneration)
    second = corpus.build(out, spec, progress=False)
    for split in SPLITS:
        np.testing.assert_array_equal(_audio(second, split), _audio(first, split))
    reopened = load_from_disk(str(out))
    np.testing.assert_array_equal(_audio(reopened, "train"), _audio(first, "train"))


def test_synthetic_corpus_is_rebuilt_when_the_spec_changes(tmp_path):
    out = tmp_path / "synth"
    corpus.build(out, SynthSpec(seed=3, per_class=1, eval_per_class=1), progress=False)
    rebuilt = corpus.build(out, SynthSpec(seed=3, per_class=2, eval_per_class=1), progress=False)
    assert len(rebuilt["train"]) == 2 * len(KS_LABELS)
    assert len(load_from_disk(str(out))["train"]) == 2 * len(KS_LABELS)


def test_synthetic_corpus_refuses_to_replace_a_directory_it_did_not_make(tmp_path):
    out = tmp_path / "my-data"
    out.mkdir()
    (out / "precious.txt").write_text("not a corpus")
    with pytest.raises(DataError, match="my-data"):
        corpus.build(out, SynthSpec(seed=3, per_class=1, eval_per_class=1), progress=False)
    assert (out / "precious.txt").read_text() == "not a corpus"


def test_synth_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="per_class"):
        SynthSpec(per_class=0)
    with pytest.raises(ValueError, match="seed"):
        SynthSpec(seed=-1)
    with pytest.raises(ValueError, match="eval_per_class"):
        SynthSpec(eval_per_class=0)


def test_worker_data_synth_command_writes_a_corpus_load_from_disk_opens(tmp_path, capsys):
    out = tmp_path / "cli-synth"
    rc = cli.main(["data", "synth", "--out", str(out), "--seed", "0", "--per-class", "1", "--eval-per-class", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"data set: {out}" in printed and "_unknown_=1" in printed
    dd = load_from_disk(str(out))
    check_splits(dd)
    assert all(len(dd[split]) == len(KS_LABELS) for split in SPLITS)
    assert dd["train"].features["label"].names == SUPERB_KS_LABELS


def test_worker_data_show_command_summarises_a_shard(tiny_corpus_dir, capsys):
    assert cli.main(["data", "show", str(tiny_corpus_dir), "--shard", "speaker:1/2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == list(SPLITS)
    assert cli.main(["data", "show", str(tiny_corpus_dir), "--shard", "iid:3/2"]) == 2
    assert "'iid:3/2'" in capsys.readouterr().err


# --- Speech Commands v0.01 directory --------------------------------------------------------------------

OTHER_WORDS = ("bed", "marvin")
# Per word: a train clip, a validation clip and a test clip, by three speakers.
SPEAKER_SPLIT = {"a1b2c3d4": "train", "0f0f0f0f": "validation", "deadbeef": "test"}


def _write(path, samples, rate=SAMPLE_RATE):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype="FLOAT")


def _speech_commands_dir(root):
    """A miniature Speech Commands v0.01: ten keyword folders, two other words, background noise, lists."""
    rng = np.random.default_rng(0)
    val, test = [], []
    for word in KEYWORDS + OTHER_WORDS:
        for speaker, split in SPEAKER_SPLIT.items():
            name = f"{word}/{speaker}_nohash_0.wav"
            _write(root / name, (0.1 * rng.standard_normal(CLIP_SAMPLES)).astype(np.float32))
            {"validation": val, "test": test}.get(split, []).append(name)
    _write(root / "yes/a1b2c3d4_nohash_1.wav", np.full(12_000, 0.5, dtype=np.float32))  # short: padded
    _write(root / "no/a1b2c3d4_nohash_1.wav", np.arange(20_000, dtype=np.float32) / 20_000)  # long: cropped
    t = np.arange(22_050) / 22_050
    _write(root / "go/a1b2c3d4_nohash_1.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22_050)
    _write(root / "_background_noise_/white_noise.wav", (0.05 * rng.standard_normal(56_000)).astype(np.float32))
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "README.md").write_text("not a folder")
    return root


@pytest.fixture(scope="module")
def sc_root(tmp_path_factory):
    return _speech_commands_dir(tmp_path_factory.mktemp("speech_commands_v0.01"))


@pytest.fixture(scope="module")
def sc_data(sc_root):
    return speech_commands.load_directory(sc_root, progress=False)


def _rows(ds: Dataset, word: str, speaker: str) -> list[dict]:
    return [r for r in ds.with_format("numpy") if r["word"] == word and r["speaker"] == speaker]


def test_speech_commands_splits_follow_the_validation_and_testing_lists(sc_data):
    check_splits(sc_data)
    for split in SPLITS:
        ds = sc_data[split]
        speech = {(w, s) for w, s in zip(ds["word"], ds["speaker"]) if w}
        expected = {(w, s) for w in KEYWORDS + OTHER_WORDS for s, sp in SPEAKER_SPLIT.items() if sp == split}
        if split == "train":  # the extra short, long and 22.05 kHz clips are on no list
            expected |= {("yes", "a1b2c3d4"), ("no", "a1b2c3d4"), ("go", "a1b2c3d4")}
        assert speech == expected
        speakers = set(ds["speaker"]) - {"_background_noise_/white_noise"}
        assert speakers == {s for s, sp in SPEAKER_SPLIT.items() if sp == split}


def test_speech_commands_keywords_keep_their_label_and_other_words_become_unknown(sc_data):
    for split in SPLITS:
        ds = sc_data[split]
        for word, label in zip(ds["word"], ds["label"]):
            if word in KEYWORDS:
                assert label == LABEL2ID[word]
            elif word:
                assert word in OTHER_WORDS and label == LABEL2ID[UNKNOWN]
            else:
                assert label == LABEL2ID[SILENCE]
    train = label_counts(sc_data["train"])
    assert train["_unknown_"] == len(OTHER_WORDS) and train["yes"] == 2


def test_speech_commands_background_noise_becomes_one_second_silence_clips(sc_root, sc_data):
    noise, _ = soundfile.read(sc_root / "_background_noise_/white_noise.wav", dtype="float32")
    silence = np.concatenate([_audio(sc_data, s)[np.asarray(sc_data[s]["label"]) == LABEL2ID[SILENCE]] for s in SPLITS])
    assert silence.shape == (3, CLIP_SAMPLES)  # 3.5 s of noise: three whole seconds
    whole_seconds = noise[:3 * CLIP_SAMPLES].reshape(3, CLIP_SAMPLES)
    assert sorted(map(bytes, silence)) == sorted(map(bytes, whole_seconds))


def test_speech_commands_clips_are_padded_or_cropped_to_one_second(sc_data):
    short = _rows(sc_data["train"], "yes", "a1b2c3d4")
    padded = [r["audio"] for r in short if r["audio"][CLIP_SAMPLES // 2] == 0.5]
    assert len(padded) == 1
    assert not padded[0][:2000].any() and not padded[0][14_000:].any() and (padded[0][2000:14_000] == 0.5).all()
    long = [r["audio"] for r in _rows(sc_data["train"], "no", "a1b2c3d4") if r["audio"][0] > 0.05]
    assert len(long) == 1
    np.testing.assert_array_equal(long[0], np.arange(2000, 18_000, dtype=np.float32) / 20_000)


def test_speech_commands_resamples_a_22k_clip_to_16k_keeping_its_pitch(sc_data):
    sines = [r["audio"] for r in _rows(sc_data["train"], "go", "a1b2c3d4") if np.abs(r["audio"]).max() > 0.45]
    assert len(sines) == 1 and sines[0].shape == (CLIP_SAMPLES,)
    spectrum = np.abs(np.fft.rfft(sines[0] * np.hanning(CLIP_SAMPLES)))
    assert np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)[np.argmax(spectrum)] == pytest.approx(440, abs=1)


def test_speech_commands_refuses_a_stereo_clip_naming_it(tmp_path):
    root = _speech_commands_dir(tmp_path / "sc")
    _write(root / "stop/a1b2c3d4_nohash_9.wav", np.zeros((CLIP_SAMPLES, 2), dtype=np.float32))
    with pytest.raises(AudioFormatError, match=r"stop/a1b2c3d4_nohash_9\.wav"):
        speech_commands.load_directory(root, progress=False)


def test_speech_commands_refuses_a_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        speech_commands.load_directory(tmp_path / "nowhere", progress=False)


@pytest.mark.parametrize("list_name", ["validation_list.txt", "testing_list.txt"])
def test_speech_commands_refuses_a_directory_without_its_lists(tmp_path, sc_root, list_name):
    root = tmp_path / "sc"
    shutil.copytree(sc_root, root)
    (root / list_name).unlink()
    with pytest.raises(DataError, match=list_name):
        speech_commands.load_directory(root, progress=False)


def test_speech_commands_refuses_a_directory_missing_keyword_folders(tmp_path, sc_root):
    root = tmp_path / "sc"
    shutil.copytree(sc_root, root)
    shutil.rmtree(root / "stop")
    shutil.rmtree(root / "off")
    with pytest.raises(DataError, match=r"keyword folder.*'off'.*'stop'.*missing"):
        speech_commands.load_directory(root, progress=False)


def test_worker_data_speech_commands_command_reports_a_data_error(tmp_path, capsys):
    rc = cli.main(["data", "speech-commands", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


# --- Hugging Face hub splits ------------------------------------------------------------------------------

def _wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _hub_split(decode: bool = False) -> tuple[Dataset, list[np.ndarray]]:
    """A split shaped like google/speech_commands v0.01 on the hub (label names in their own order)."""
    names = ["bed", "go", "_silence_", "yes", "marvin", "stop"]
    rng = np.random.default_rng(1)
    lengths = (CLIP_SAMPLES, 12_000, 3 * CLIP_SAMPLES, 20_000, CLIP_SAMPLES)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    rows = {
        "audio": [{"bytes": _wav_bytes(c), "path": f"clip{i}.wav"} for i, c in enumerate(clips)],
        "label": [0, 1, 2, 3, 4],  # bed, go, _silence_, yes, marvin
        "speaker_id": ["s0", "s1", None, "s3", "s4"],
    }
    # Built as plain structs and cast: encoding audio into an Audio column needs torchcodec in datasets 5,
    # casting does not (this is also how a split read from the hub's parquet files arrives).
    features = Features({"audio": Audio(decode=decode), "label": ClassLabel(names=names), "speaker_id": Value("string")})
    return Dataset.from_dict(rows).cast(features), clips


@pytest.mark.parametrize("decode", [False, True], ids=["audio-decode-false", "audio-decode-true"])
def test_hub_split_converts_to_ks_format_mapping_labels_by_name(decode):
    hub, clips = _hub_split(decode)
    ds = speech_commands.convert_hub_split(hub, "hub[test]")
    assert ds.features["label"].names == SUPERB_KS_LABELS
    assert [KS_LABELS[i] for i in ds["label"]] == ["_unknown_", "go", "_silence_", "yes", "_unknown_"]
    assert ds["word"] == ["bed", "go", "", "yes", "marvin"]
    assert ds["speaker"] == ["s0", "s1", "", "s3", "s4"]
    audio = np.asarray(ds.with_format("numpy")["audio"])
    assert audio.shape == (5, CLIP_SAMPLES) and audio.dtype == np.float32
    np.testing.assert_array_equal(audio[0], clips[0])
    np.testing.assert_array_equal(audio[1][2000:14_000], clips[1])  # short: centred
    np.testing.assert_array_equal(audio[2], clips[2][:CLIP_SAMPLES])  # long silence: its first second
    np.testing.assert_array_equal(audio[3], clips[3][2000:18_000])  # long word: centre-cropped


def test_hub_split_without_audio_column_is_refused():
    ds = Dataset.from_dict({"label": [0]})
    with pytest.raises(DataError, match="'audio'"):
        speech_commands.convert_hub_split(ds, "hub[x]")


def test_unknown_hub_source_is_refused():
    with pytest.raises(DataError, match="'nope'"):
        speech_commands.load_hub("nope")
