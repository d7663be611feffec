"""The latency bench's own measuring: bursts at every phase of the frame grid, and onsets
found where the bursts really start after a trip through a sound server."""

from __future__ import annotations

import types

import numpy as np
import pytest

from livecam.bench_live import _heard_onsets, _responses, burst_train
from livecam.constants import SAMPLE_RATE


@pytest.mark.parametrize(("count", "fps"), [(15, 30.0), (8, 25.0), (5, 30.0)])
def test_bursts_sample_every_phase_of_the_frame_grid_evenly(count, fps):
    audio, onsets = burst_train(count, fps)
    assert onsets[-1] + 0.25 * SAMPLE_RATE <= len(audio)  # the last burst fits whole
    phases = sorted((n * fps / SAMPLE_RATE) % 1.0 for n in onsets)
    # one burst in each 1/count of the frame period (a sample of rounding at most)
    steps = np.diff([*phases, phases[0] + 1.0])
    assert np.allclose(steps, 1.0 / count, atol=2 * fps / SAMPLE_RATE), phases


def test_heard_onsets_are_where_the_bursts_start_not_where_they_get_loud():
    audio, onsets = burst_train(15, 30.0)
    player = types.SimpleNamespace(audio=audio, onsets=onsets)
    shift = 1234  # a sound server's delay; PipeWire also hands a mono stream 3 dB louder
    rng = np.random.default_rng(1)
    heard = np.concatenate([0.001 * rng.standard_normal(shift), 1.41 * audio])
    heard = (heard + 0.001 * rng.standard_normal(len(heard))).astype(np.float32)
    found = np.array(_heard_onsets(heard, player))
    # the detector looks at 1 ms of energy at a time: each onset within that of the truth
    assert np.abs(found - (np.array(onsets) + shift)).max() <= SAMPLE_RATE // 1000, found


def test_a_burst_with_no_frames_near_it_is_undetected_not_a_crash():
    # 4 s of frames at 30 fps; the mouth opens at 1.1 s for a burst at 1.0 s
    times = np.arange(120) / 30.0
    probe = types.SimpleNamespace(samples=[(t, 5.0 if 1.1 <= t < 1.4 else 0.0) for t in times])
    found = _responses(probe, [1.0, 60.0], 0.02)  # no frame within a second of 60 s
    assert found == [pytest.approx(times[33] - 1.0 + 0.02)]
    assert _responses(probe, [60.0], 0.02) == []
