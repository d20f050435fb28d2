"""Error feedback: the residual keeps what compression dropped, so decoded updates track the raw deltas;
what happens on dropped updates, codec or shape changes, failures, and across a restart (save/load)."""
from __future__ import annotations

import os

import pytest
import torch

from common.compression.codecs import CodecError, decode, encode
from common.compression.error_feedback import ErrorFeedback
from common.compression.sparse import SparseTensor

SHAPES = {"w": (30, 40), "b": (40,)}


def _dense(x) -> torch.Tensor:
    return x.to_dense() if isinstance(x, SparseTensor) else x


def _deltas(steps: int, seed: int = 0, drift: float = 1.0):
    """Deltas like local training's: a steady direction per parameter plus noise."""
    g = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    for _ in range(steps):
        yield {n: drift * direction[n] + torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _zeros():
    return {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}


def _norm(state) -> float:
    return float(sum(t.double().pow(2).sum() for t in state.values()) ** 0.5)


def test_sum_of_decoded_updates_tracks_the_sum_of_raw_deltas():
    ef = ErrorFeedback("exp")
    raw, sent, sent_without_ef = _zeros(), _zeros(), _zeros()
    gaps = []
    for delta in _deltas(200):
        enc = ef.compress(delta, "topk:0.05+int8")
        plain = encode(delta, "topk:0.05+int8")
        for n in SHAPES:
            raw[n] += delta[n]
            sent[n] += _dense(enc.decoded[n])
            sent_without_ef[n] += _dense(plain.decoded[n])
        gap = {n: raw[n] - sent[n] for n in SHAPES}
        # the invariant: what was not sent yet is exactly the residual (up to float32 rounding)
        assert _norm({n: gap[n] - ef.residual[n] for n in SHAPES}) <= 1e-4 * _norm(raw)
        gaps.append(_norm(gap))
    # with error feedback the gap stays bounded; without it, it grows with every step
    assert max(gaps[100:]) <= 1.5 * max(gaps[:100])
    assert gaps[-1] < 0.1 * _norm(raw)
    assert _norm({n: raw[n] - sent_without_ef[n] for n in SHAPES}) > 0.5 * _norm(raw)


def test_a_dropped_update_loses_exactly_its_decoded_part_and_the_residual_survives():
    ef = ErrorFeedback("exp")
    raw, delivered = _zeros(), _zeros()
    dropped = None
    for step, delta in enumerate(_deltas(30, seed=1)):
        enc = ef.compress(delta, "topk:0.05+int8")  # tasks from any model version: the residual is kept
        for n in SHAPES:
            raw[n] += delta[n]
        if step == 12:  # the coordinator rejects this one as stale
            dropped = {n: _dense(v).double() for n, v in enc.decoded.items()}
            continue
        for n in SHAPES:
            delivered[n] += _dense(enc.decoded[n])
    lost = {n: raw[n] - delivered[n] - ef.residual[n] - dropped[n] for n in SHAPES}
    assert _norm(lost) <= 1e-4 * _norm(raw)
    assert _norm(dropped) > 0


def test_lossless_codec_sends_everything_and_keeps_no_residual():
    ef = ErrorFeedback("exp")
    d1, d2 = list(_deltas(2, seed=3))
    ef.compress(d1, "fp16")
    assert ef.residual_norm() > 0  # fp16 is lossy: a small residual
    enc = ef.compress(d2, "none")  # a codec change resets the fp16 residual first
    assert ef.residual == {} and ef.residual_norm() == 0.0 and ef.codec == "none"
    assert all(torch.equal(enc.decoded[n], d2[n]) for n in SHAPES)
    enc = ef.compress(d1, "zlib")
    assert ef.residual == {} and all(torch.equal(enc.decoded[n], d1[n]) for n in SHAPES)


def test_compress_returns_what_decode_reconstructs_and_leaves_the_delta_alone():
    ef = ErrorFeedback("exp")
    for delta in _deltas(3):
        before = {n: t.clone() for n, t in delta.items()}
        enc = ef.compress(delta, "topk:0.1+int8+zlib")
        out = decode(enc.data, "topk:0.1+int8+zlib")
        for n in SHAPES:
            assert torch.equal(out[n].indices, enc.decoded[n].indices) and torch.equal(out[n].values, enc.decoded[n].values)
            assert torch.equal(delta[n], before[n])
        assert enc.raw_bytes == 4 * (30 * 40 + 40) and enc.wire_bytes == len(enc.data)


def test_first_update_is_the_plain_encoding_and_the_second_carries_the_residual():
    ef = ErrorFeedback("exp")
    d1, d2 = list(_deltas(2, seed=4))
    assert ef.compress(d1, "topk:0.1").data == encode(d1, "topk:0.1").data
    corrected = {n: d2[n] + ef.residual[n] for n in SHAPES}
    assert ef.compress(d2, "topk:0.1").data == encode(corrected, "topk:0.1").data


def test_codec_change_resets_the_residual(capsys):
    ef = ErrorFeedback("exp")
    d1, d2 = list(_deltas(2, seed=5))
    ef.compress(d1, "topk:0.1")
    assert ef.residual_norm() > 0
    enc = ef.compress(d2, "topk:0.2")
    assert enc.data == encode(d2, "topk:0.2").data  # nothing of the old residual was added
    assert "error_feedback_reset" in "".join(capsys.readouterr()) and ef.codec == "topk:0.2"
    ef.compress(d1, "topk:k=0.2+int8:block=256")
    ef.compress(d2, "topk:0.2+int8")  # the same codec spelled differently: kept
    assert "error_feedback_reset" in "".join(capsys.readouterr())  # once, for the +int8 change


def test_parameter_name_or_shape_change_resets_the_residual(capsys):
    ef = ErrorFeedback("exp")
    d1 = next(_deltas(1))
    ef.compress(d1, "topk:0.1")
    reshaped = {"w": torch.randn(40, 30), "b": torch.randn(40)}
    assert ef.compress(reshaped, "topk:0.1").data == encode(reshaped, "topk:0.1").data
    renamed = {"w2": torch.randn(30, 40), "b": torch.randn(40)}
    assert ef.compress(renamed, "topk:0.1").data == encode(renamed, "topk:0.1").data
    assert "".join(capsys.readouterr()).count("parameter names or shapes changed") == 2


def test_failed_encode_resets_the_residual_and_raises():
    ef = ErrorFeedback("exp")
    ef.compress(next(_deltas(1)), "topk:0.1+int8")
    bad = {"w": torch.full((30, 40), float("nan")), "b": torch.zeros(40)}
    with pytest.raises(CodecError, match="w: .*non-finite"):
        ef.compress(bad, "topk:0.1+int8")
    assert ef.residual == {}
    good = next(_deltas(1, seed=6))
    assert ef.compress(good, "topk:0.1+int8").data == encode(good, "topk:0.1+int8").data


def test_save_and_load_restore_the_residual_across_a_restart(tmp_path):
    path = tmp_path / "ef.mqef"
    steps = list(_deltas(4, seed=7))
    ef = ErrorFeedback("exp")
    for d in steps[:3]:
        ef.compress(d, "topk:0.05+int8")
    ef.save(path)
    assert os.listdir(tmp_path) == ["ef.mqef"]  # no temporary file left behind
    restarted = ErrorFeedback("exp")
    assert restarted.load(path, "topk:k=0.05+int8") is True
    assert restarted.codec == "topk:0.05+int8"
    for n in SHAPES:
        assert torch.equal(restarted.residual[n], ef.residual[n])
    assert restarted.compress(steps[3], "topk:0.05+int8").data == ef.compress(steps[3], "topk:0.05+int8").data


def test_saving_again_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "ef.mqef"
    ef = ErrorFeedback("exp")
    ef.save(path)  # a zero residual saves and loads too
    fresh = ErrorFeedback("exp")
    assert fresh.load(path) is True and fresh.residual == {}
    ef.compress(next(_deltas(1)), "topk:0.1")
    ef.save(path)
    assert fresh.load(path) is True and fresh.residual_norm() == pytest.approx(ef.residual_norm())
    assert os.listdir(tmp_path) == ["ef.mqef"]


@pytest.mark.parametrize(
    ("saved_for", "load_with", "reason"),
    [
        ("other-exp", None, "saved for experiment 'other-exp'"),
        ("exp", "topk:0.2", "saved for codec 'topk:0.1', not 'topk:0.2'"),
    ],
)
def test_load_of_a_residual_for_another_experiment_or_codec_starts_from_zero(tmp_path, capsys, saved_for, load_with, reason):
    path = tmp_path / "ef.mqef"
    ef = ErrorFeedback(saved_for)
    ef.compress(next(_deltas(1)), "topk:0.1")
    ef.save(path)
    other = ErrorFeedback("exp")
    other.compress(next(_deltas(1, seed=8)), "topk:0.1")
    assert other.load(path, load_with) is False
    assert other.residual == {}
    assert reason in "".join(capsys.readouterr())


def test_restart_with_another_codec_resets_at_the_first_task(tmp_path, capsys):
    path = tmp_path / "ef.mqef"
    ef = ErrorFeedback("exp")
    ef.compress(next(_deltas(1)), "topk:0.1")
    ef.save(path)
    restarted = ErrorFeedback("exp")
    assert restarted.load(path) is True  # the worker does not know the next task's codec yet
    d = next(_deltas(1, seed=9))
    assert restarted.compress(d, "topk:0.1+int8").data == encode(d, "topk:0.1+int8").data
    assert "codec changed from 'topk:0.1' to 'topk:0.1+int8'" in "".join(capsys.readouterr())


def test_missing_or_corrupt_residual_file_starts_from_zero(tmp_path, capsys):
    ef = ErrorFeedback("exp")
    assert ef.load(tmp_path / "absent.mqef") is False and ef.residual == {}
    assert "error_feedback_fresh" in "".join(capsys.readouterr())
    path = tmp_path / "ef.mqef"
    ef.compress(next(_deltas(1)), "topk:0.1")
    ef.save(path)
    data = path.read_bytes()
    for corrupt in (data[:-7], b"MQEF" + b"\xff" * 12, b"junk", data[:4] + b"\x00\x00\x00\x00" + data[8:]):
        path.write_bytes(corrupt)
        assert ErrorFeedback("exp").load(path) is False
        assert "corrupt residual file" in "".join(capsys.readouterr())


def test_residual_follows_the_delta_device_and_dtype():
    ef = ErrorFeedback("exp")
    d = {n: t.to(torch.bfloat16) for n, t in next(_deltas(1)).items()}
    ef.compress(d, "topk:0.1")
    assert all(t.dtype is torch.float32 for t in ef.residual.values())
    ef.compress(d, "topk:0.1")


def test_a_prepared_update_changes_the_residual_only_once_committed():
    ef = ErrorFeedback("exp")
    deltas = list(_deltas(3))
    ef.compress(deltas[0], "topk:0.1+int8")
    before = {n: t.clone() for n, t in ef.residual.items()}
    lost = ef.prepare(deltas[1], "topk:0.1+int8")  # its upload fails: never committed
    assert all(torch.equal(ef.residual[n], before[n]) for n in before)
    redone = ef.prepare(deltas[1], "topk:0.1+int8")  # the task redone elsewhere starts from the same residual
    assert redone.encoded.data == lost.encoded.data
    ef.commit(redone)
    decoded = decode(redone.encoded.data)
    for n in before:  # telescoping: residual_before + delta == decoded + residual_after
        d = decoded[n].to_dense() if hasattr(decoded[n], "to_dense") else decoded[n]
        torch.testing.assert_close(before[n] + deltas[1][n], d + ef.residual[n], rtol=0, atol=1e-6)


def test_a_residual_saved_by_another_run_is_not_restored(tmp_path):
    path = tmp_path / "residual.bin"
    old = ErrorFeedback("exp@run-a")
    old.compress(next(_deltas(1)), "topk:0.1")
    old.save(path)
    assert ErrorFeedback("exp@run-a").load(path)
    assert not ErrorFeedback("exp@run-b").load(path)  # --fresh made a new run: its residual starts at zero
