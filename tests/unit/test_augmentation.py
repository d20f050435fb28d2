"""Training-time augmentation (common/learning/training.py `augment`, TrainConfig's speed, eq_db, gain_db,
noise_snr_db, time_masks and time_mask_ms): each does what it says to the number, draws only from the training generator
(repeatable), and when off changes nothing: not the batch, not the generator, not the trained weights. The
settings are validated naming the field and travel in a train task (common/wire/messages.py)."""
from __future__ import annotations

import math
import re

import msgpack
import numpy as np
import pytest
import torch

from common.data.audio import SAMPLE_RATE
from common.learning.config import TrainConfig
from common.learning.model import ModelSpec, build_model
from common.learning.training import EQ_ANCHORS_HZ, Clips, augment, train
from common.wire import messages

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N = 16_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _config(**kw) -> TrainConfig:
    return TrainConfig(steps=1, **kw)


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = torch.diff(padded)
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


# --- off ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("off", [{}, {"speed": None, "eq_db": 0.0, "gain_db": 0.0, "noise_snr_db": None},
                                 {"time_masks": 4, "time_mask_ms": 0.0}, {"time_masks": 0, "time_mask_ms": 100.0}])
def test_augmentation_off_returns_the_batch_and_draws_nothing(off):
    batch = torch.randn(4, N)
    gen = _gen()
    out = augment(batch, _config(**off), gen)
    assert out is batch
    assert torch.equal(gen.get_state(), _gen().get_state())
    assert not _config(**off).augments


def test_training_with_augmentation_off_is_bit_identical_to_the_defaults(tiny_corpus):
    from common.data.dataset import to_arrays

    clips = Clips.from_arrays(*to_arrays(tiny_corpus["train"]))
    states = []
    for config in (TrainConfig(steps=2, batch_size=4, seed=3),
                   TrainConfig(steps=2, batch_size=4, seed=3, speed=None, gain_db=0.0, noise_snr_db=None,
                               time_masks=5, time_mask_ms=0.0)):
        model = build_model(ModelSpec("kws-tiny"))
        train(model, clips, config)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_training_with_augmentation_is_repeatable_and_differs_from_without(tiny_corpus):
    from common.data.dataset import to_arrays

    clips = Clips.from_arrays(*to_arrays(tiny_corpus["train"]))
    on = dict(speed=(0.9, 1.1), eq_db=10.0, gain_db=6.0, noise_snr_db=(10.0, 30.0), time_masks=2, time_mask_ms=50.0)
    states = []
    for config in (TrainConfig(steps=2, batch_size=4, seed=3, **on), TrainConfig(steps=2, batch_size=4, seed=3, **on),
                   TrainConfig(steps=2, batch_size=4, seed=3)):
        model = build_model(ModelSpec("kws-tiny"))
        result = train(model, clips, config)
        assert math.isfinite(result.loss)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_augment_is_repeatable_with_the_same_generator_seed():
    batch = 0.1 * torch.randn(3, N, generator=_gen(9))
    config = _config(speed=(0.8, 1.2), eq_db=10.0, gain_db=6.0, noise_snr_db=(0.0, 20.0), time_masks=3,
                     time_mask_ms=40.0)
    a, b, c = (augment(batch, config, _gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == batch.shape and a.dtype == batch.dtype and torch.isfinite(a).all()


# --- time masks -----------------------------------------------------------------------------------------

def test_one_time_mask_zeroes_one_span_of_at_most_the_width():
    ones = torch.ones(400, N)
    out = augment(ones, _config(time_masks=1, time_mask_ms=50.0), _gen())
    width = 50 * SAMPLE_RATE // 1000  # 800 samples
    lengths = []
    for row in out == 0:
        runs = _runs(row)
        assert len(runs) <= 1  # a width-0 mask zeroes nothing
        lengths += [n for _, n in runs]
    assert max(lengths) <= width and min(lengths) >= 1
    assert max(lengths) > 0.9 * width and np.mean(lengths) == pytest.approx(width / 2, rel=0.15)  # uniform widths
    assert ((out == 0) | (out == 1)).all()  # nothing but zeroing


def test_several_time_masks_zero_at_most_that_many_spans_of_at_most_the_width_each():
    ones = torch.ones(300, N)
    out = augment(ones, _config(time_masks=4, time_mask_ms=20.0), _gen(1))
    width = 20 * SAMPLE_RATE // 1000
    counts = []
    for row in out == 0:
        runs = _runs(row)
        assert len(runs) <= 4 and all(n <= 4 * width for _, n in runs)  # overlapping spans merge
        counts.append(int(row.sum()))
    assert max(counts) <= 4 * width
    assert np.mean(counts) == pytest.approx(4 * width / 2, rel=0.2)  # 4 masks of mean width w/2 (little overlap)


def test_a_mask_as_wide_as_the_clip_can_zero_all_of_it_and_never_runs_off_the_end():
    out = augment(torch.ones(200, N), _config(time_masks=1, time_mask_ms=1000.0), _gen(2))
    zeros = (out == 0).sum(1)
    assert zeros.max() <= N and zeros.max() > 0.9 * N


# --- noise, gain, speed ---------------------------------------------------------------------------------

def _snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    noise = (noisy - clean).double()
    return 10 * torch.log10(clean.double().pow(2).mean(-1) / noise.pow(2).mean(-1))


def test_noise_is_added_at_exactly_the_snr_asked_for():
    clean = 0.3 * torch.sin(torch.arange(N) * 0.05).repeat(8, 1) * torch.linspace(0.1, 1, 8).unsqueeze(1)
    for snr in (-5.0, 0.0, 10.0, 40.0):
        noisy = augment(clean, _config(noise_snr_db=(snr, snr)), _gen())
        assert _snr_db(clean, noisy).tolist() == pytest.approx([snr] * 8, abs=1e-3)


def test_noise_snr_is_drawn_per_clip_from_the_range():
    clean = 0.1 * torch.randn(500, N, generator=_gen(5))
    snr = _snr_db(clean, augment(clean, _config(noise_snr_db=(5.0, 25.0)), _gen()))
    assert snr.min() >= 5.0 - 1e-3 and snr.max() <= 25.0 + 1e-3
    assert snr.min() < 6.0 and snr.max() > 24.0 and float(snr.mean()) == pytest.approx(15.0, abs=1.0)


def test_noise_leaves_a_silent_clip_silent():
    out = augment(torch.zeros(2, N), _config(noise_snr_db=(0.0, 10.0)), _gen())
    assert torch.equal(out, torch.zeros(2, N))


def test_gain_scales_each_clip_by_a_factor_within_the_range():
    quiet = torch.full((500, N), 0.01)
    out = augment(quiet, _config(gain_db=6.0), _gen())
    ratio = out / quiet
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one factor per clip
    db = 20 * torch.log10(ratio[:, 0].double())
    assert db.min() >= -6.0 - 1e-4 and db.max() <= 6.0 + 1e-4
    assert db.min() < -5.5 and db.max() > 5.5 and abs(float(db.mean())) < 0.6


def test_gain_clips_to_full_scale_like_a_recording():
    loud = torch.full((200, N), 0.9)
    out = augment(loud, _config(gain_db=20.0), _gen())
    assert out.max() == 1.0 and out.min() > 0 and torch.equal(out, out[:, :1].expand_as(out))
    clipped = float((out[:, 0] == 1.0).double().mean())  # gains above 20 log10(1 / 0.9) = 0.92 dB saturate
    assert clipped == pytest.approx((20 - 20 * math.log10(1 / 0.9)) / 40, abs=0.1)


@pytest.mark.parametrize("factor, content", [(0.5, 8000), (0.8, 5000), (1.0, 4000), (1.25, 3200), (2.0, 2000)])
def test_speed_perturbation_changes_the_content_length_by_the_factor_and_keeps_one_second(factor, content):
    burst = torch.zeros(3, N)
    burst[:, 6000:10000] = 0.5  # 0.25 s of sound in the middle
    out = augment(burst, _config(speed=(factor, factor)), _gen())
    assert out.shape == (3, N)
    assert (out != 0).sum(1).tolist() == pytest.approx([content] * 3, abs=1)
    nonzero = torch.nonzero(out[0]).flatten()
    assert abs(int(nonzero[0] + nonzero[-1]) / 2 - N / 2) <= 2  # still centred


def test_speed_one_is_the_identity_and_slowing_down_crops_to_the_centre():
    clip = torch.randn(2, N, generator=_gen(4))
    assert torch.equal(augment(clip, _config(speed=(1.0, 1.0)), _gen()), clip)
    ramp = torch.arange(N, dtype=torch.float32).repeat(1, 1)
    slow = augment(ramp, _config(speed=(0.5, 0.5)), _gen())[0]
    assert slow[0] == pytest.approx(N / 4, abs=1) and slow[-1] == pytest.approx(3 * N / 4, abs=1)  # the middle half
    assert torch.allclose(torch.diff(slow), torch.full((N - 1,), 0.5))  # stretched twice as long


def test_speed_factors_are_drawn_per_clip_from_the_range():
    burst = torch.zeros(400, N)
    burst[:, 4000:12000] = 1.0
    lengths = (augment(burst, _config(speed=(0.8, 1.25)), _gen()) != 0).sum(1).double()
    factors = 8000 / lengths
    assert factors.min() >= 0.8 - 1e-3 and factors.max() <= 1.25 + 1e-3
    assert factors.min() < 0.82 and factors.max() > 1.22


# --- equalisation -------------------------------------------------------------------------------------

def _tone_db(clip: torch.Tensor, hz: float) -> float:
    """The level (dB) of the `hz` component of a 1 s clip (an exact rfft bin)."""
    return 20 * math.log10(float(torch.fft.rfft(clip.double()).abs()[int(hz)]))


def test_equalisation_gives_each_octave_anchor_its_drawn_gain_to_the_number():
    # tones at every anchor: each comes out scaled by its own drawn gain (then all by one power-keeping factor)
    t = torch.arange(N) / SAMPLE_RATE
    anchors = [hz for hz in EQ_ANCHORS_HZ if hz < SAMPLE_RATE / 2] + [3000.0]  # 8 kHz is Nyquist; 3 kHz between
    clip = sum(0.1 * torch.sin(2 * math.pi * hz * t) for hz in anchors).repeat(5, 1)
    out = augment(clip, _config(eq_db=12.0), _gen(3))
    drawn = (2 * torch.rand((5, len(EQ_ANCHORS_HZ)), generator=_gen(3)) - 1) * 12.0  # what _equalize draws
    for row in range(5):
        level = {hz: _tone_db(out[row], hz) - _tone_db(clip[row], hz) for hz in anchors}
        offset = level[1000.0] - float(drawn[row, 4])  # the power-keeping factor, the same for every tone
        for k, hz in enumerate(EQ_ANCHORS_HZ[:-1]):
            assert level[hz] - offset == pytest.approx(float(drawn[row, k]), abs=1e-3)
        # 3 kHz is log2(1.5) of the way from the 2 kHz anchor to the 4 kHz one
        between = float(drawn[row, 5]) + math.log2(1.5) * float(drawn[row, 6] - drawn[row, 5])
        assert level[3000.0] - offset == pytest.approx(between, abs=1e-3)
    assert (drawn.abs() <= 12.0).all() and drawn.abs().max() > 6.0


def test_equalisation_keeps_each_clips_power_and_a_silent_clip_silent():
    clip = 0.1 * torch.randn(6, N, generator=_gen(8))
    out = augment(clip, _config(eq_db=20.0), _gen())
    assert out.pow(2).mean(-1).tolist() == pytest.approx(clip.pow(2).mean(-1).tolist(), rel=1e-4)
    assert not torch.allclose(out, clip, atol=1e-3)
    assert torch.equal(augment(torch.zeros(2, N), _config(eq_db=20.0), _gen()), torch.zeros(2, N))


def test_equalisation_is_flat_below_the_lowest_anchor_and_at_dc():
    clip = torch.full((3, N), 0.2) + 0.1 * torch.sin(2 * math.pi * 30.0 * torch.arange(N) / SAMPLE_RATE)
    out = augment(clip, _config(eq_db=12.0), _gen(4))
    dc = torch.fft.rfft(out.double()).abs()[:, 0] / torch.fft.rfft(clip.double()).abs()[:, 0]
    low = torch.fft.rfft(out.double()).abs()[:, 30] / torch.fft.rfft(clip.double()).abs()[:, 30]
    assert dc.tolist() == pytest.approx(low.tolist(), rel=1e-6)  # 0 Hz and 30 Hz both get the 62.5 Hz gain


# --- config and wire ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("speed", [1.2, 1.1]), ("speed", [0.4, 1.0]), ("speed", [1.0, 2.5]), ("speed", [1.0]), ("speed", [1, 1, 1]),
    ("speed", [math.nan, 1.0]), ("speed", "fast"), ("speed", [True, 1.0]), ("speed", 1.1),
    ("noise_snr_db", [20.0, 10.0]), ("noise_snr_db", [-30.0, 0.0]), ("noise_snr_db", [0.0, math.inf]),
    ("noise_snr_db", {}), ("gain_db", -1.0), ("gain_db", 41.0), ("gain_db", math.nan), ("gain_db", True),
    ("eq_db", -1.0), ("eq_db", 25.0), ("eq_db", math.nan), ("eq_db", math.inf), ("eq_db", "10"),
    ("time_masks", -1), ("time_masks", 33), ("time_masks", 1.5), ("time_mask_ms", -1.0), ("time_mask_ms", 1001.0),
])
def test_augmentation_settings_refuse_a_bad_value_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{"steps": 1, field: value})


def test_ranges_given_as_lists_become_tuples_of_floats():
    config = TrainConfig(steps=1, speed=[1, 1.1], noise_snr_db=[5, 20])
    assert config.speed == (1.0, 1.1) and config.noise_snr_db == (5.0, 20.0)
    assert all(isinstance(v, float) for v in config.speed + config.noise_snr_db) and config.augments


def test_augmentation_settings_travel_in_a_train_task():
    local = TrainConfig(steps=3, speed=(0.9, 1.1), eq_db=10.0, gain_db=6.0, noise_snr_db=(5.0, 20.0), time_masks=2,
                        time_mask_ms=40.0)
    task = messages.TrainTask("exp", "run-1", "t1", 0, 4e9, "none", "kws-tiny", False, local)
    back = messages.decode(messages.encode(task))
    assert back == task and back.local.speed == (0.9, 1.1) and back.local.eq_db == 10.0


@pytest.mark.parametrize("local, phrase", [
    ({"speed": [0.9]}, "train_task.local.speed: expected tuple[float, float] | None, got list"),
    ({"speed": [0.9, "1.1"]}, "train_task.local.speed: expected tuple[float, float] | None, got list"),
    ({"speed": [0.9, 1.0, 1.1]}, "train_task.local.speed: expected"),
    ({"speed": [2.0, 0.9]}, "TrainConfig.speed must be"),
    ({"noise_snr_db": 10}, "train_task.local.noise_snr_db"),
    ({"time_masks": 10**6}, "TrainConfig.time_masks must be"),
    ({"time_mask_ms": 1e300}, "TrainConfig.time_mask_ms must be"),
    ({"gain_db": 1e300}, "TrainConfig.gain_db must be"),
    ({"eq_db": 1e300}, "TrainConfig.eq_db must be"),
    ({"eq_db": -3.0}, "TrainConfig.eq_db must be"),
    ({"eq_db": "loud"}, "train_task.local.eq_db"),
])
def test_hostile_augmentation_settings_in_a_train_task_are_an_invalid_field(local, phrase):
    body = msgpack.unpackb(messages.encode(messages.TrainTask("exp", "run-1", "t1", 0, 4e9, "none", "kws-tiny", False,
                                                              TrainConfig(steps=1))), raw=False)
    body["local"].update(local)
    with pytest.raises(messages.InvalidField, match=re.escape(phrase)):
        messages.decode(msgpack.packb(body, use_bin_type=True))
