"""The latency bench's own measuring: bursts at every phase of the frames and hops, and onsets
found where the bursts really start after a trip through a sound server."""

from __future__ import annotations

import types

import numpy as np
import pytest

from livecam.bench_live import _heard_onsets, _responses, burst_train, response_cycle
from livecam.constants import HOPS_PER_SECOND, SAMPLE_RATE


@pytest.mark.parametrize(("count", "fps"), [(15, 30.0), (8, 25.0), (5, 30.0), (6, 24.0)])
def test_bursts_sample_every_position_of_the_frame_and_hop_cycle_evenly(count, fps):
    audio, onsets = burst_train(count, fps)
    assert onsets[-1] + 0.25 * SAMPLE_RATE <= len(audio)  # the last burst fits whole
    cycle = response_cycle(fps)
    assert (cycle * fps) % 1 == pytest.approx(0) and (cycle * HOPS_PER_SECOND) % 1 == 0
    positions = sorted((n / SAMPLE_RATE / cycle) % 1.0 for n in onsets)
    # one burst in each 1/count of the cycle (a sample of rounding at most)
    steps = np.diff([*positions, positions[0] + 1.0])
    assert np.allclose(steps, 1.0 / count, atol=2 / SAMPLE_RATE / cycle), positions


def test_the_cycle_is_where_frames_and_hops_line_up_again():
    assert response_cycle(30.0) == pytest.approx(0.1)  # 3 frames, 5 hops
    assert response_cycle(25.0) == pytest.approx(0.04)  # 1 frame, 2 hops
    assert response_cycle(24.0) == pytest.approx(0.5)  # 12 frames, 25 hops
    assert response_cycle(29.97) == pytest.approx(1 / 29.97)  # never: a frame at least


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
