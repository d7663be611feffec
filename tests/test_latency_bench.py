"""The latency bench's own measuring: bursts at every phase of the frames and hops, onsets
found where the bursts really start after a trip through a sound server, played onsets timed
by a stream's settled stamps, and the estimate read while the bursts play."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

from livecam.bench_live import (
    EstimateLog,
    _heard_onsets,
    _responses,
    _times_of,
    burst_train,
    response_cycle,
)
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


@pytest.mark.parametrize("playback", [True, False])
def test_stream_times_follow_the_settled_stamps_not_a_new_streams_wander(playback):
    # 20 s of 10 ms blocks whose callbacks run 20 ms before their sound plays (or 20 ms after
    # it was captured), with 2 ms of callback jitter; the reported delay is up to 12 ms off in
    # the first 8 s (PipeWire settling), and an underrun at 13.5 s moves all after it 30 ms
    rng = np.random.default_rng(3)
    sign = 1.0 if playback else -1.0
    blocks, met_at = [], {}
    for i in range(2000):
        first, slip = i * 160, 0.03 if i >= 1350 else 0.0
        met = 100.0 + first / SAMPLE_RATE + slip  # when the block's first sample met the card
        arrival = met - sign * 0.020 + abs(rng.normal(0, 0.002))  # late callbacks only
        settling = 0.012 * np.sin(np.pi * i / 800) if i < 800 else 0.0
        blocks.append((first, 160, arrival, sign * (met - arrival) + settling))
        met_at[first] = met
    samples = [n * SAMPLE_RATE + 800 for n in range(1, 19)]  # mid-block, every second
    found = _times_of(blocks, samples, 0.02, playback)
    truth = [met_at[n - 800] + 800 / SAMPLE_RATE for n in samples]
    off_ms = (np.array(found) - truth) * 1e3
    assert np.abs(off_ms).max() < 1.0, off_ms.round(2)  # each block's own stamps: up to 12 ms


def test_stream_times_without_host_timing_use_the_earliest_callback_and_the_latency():
    blocks = [(i * 160, 160, 50.0 + i * 0.01 + (0.004 if i % 3 else 0.0), None) for i in range(300)]
    # sample 0 by the earliest callback (a block ends as its callback runs), then the latency
    assert _times_of(blocks, [16000], 0.02, True) == [pytest.approx(50.0 - 0.01 + 0.02 + 1.0)]
    assert _times_of(blocks, [16000], 0.02, False) == [pytest.approx(50.0 - 0.01 - 0.02 + 1.0)]


def test_the_estimate_is_read_as_it_was_when_each_burst_played():
    log = EstimateLog(types.SimpleNamespace())
    log.samples = [(float(t), 0.060 if t < 10 else 0.050) for t in range(20)]
    assert log.at([5.5, 6.5, 12.5, 13.5, 14.5]) == pytest.approx(0.050)  # the median burst's
    assert log.at([5.5]) == pytest.approx(0.060)
    assert log.at([-1.0]) is None  # before the first reading
    assert log.at([9.5, 10.0]) == pytest.approx(0.060)  # a reading counts from after its time


def test_the_estimate_log_reads_the_pipeline_while_it_runs_and_stops():
    readings = iter(range(1000))
    pipeline = types.SimpleNamespace(latency_s=lambda: next(readings) / 1000)
    with EstimateLog(pipeline) as log:
        deadline = time.monotonic() + 5
        while len(log.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    count = len(log.samples)
    assert count >= 3 and [v for _, v in log.samples] == [i / 1000 for i in range(count)]
    time.sleep(2 * EstimateLog.INTERVAL_S)
    assert len(log.samples) == count
    assert not any(t.name == "estimate-log" for t in threading.enumerate())
