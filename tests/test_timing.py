"""Capture and playback timing measured from the stream: host timestamps (noisy, with a
start-up backlog) smoothed by a running median, and the arrival-jitter fallback. Explicit
times, no sound card."""

from __future__ import annotations

import types

import numpy as np
import pytest

from livecam.audio import sources, timing
from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.sources import MicSource
from livecam.audio.timing import MIN_BLOCKS, CaptureTiming, StreamTiming, host_delay
from livecam.constants import BLOCK, SAMPLE_RATE


def test_host_delay_rejects_missing_backwards_and_implausible_stamps():
    assert host_delay(10.0, 9.98) == pytest.approx(0.02)  # captured 20 ms ago
    assert host_delay(10.0, 10.03, playback=True) == pytest.approx(0.03)  # heard in 30 ms
    assert host_delay(0.0, 0.0) is None  # a host without timing
    assert host_delay(10.0, 10.0) is None
    assert host_delay(10.0, 10.02) is None  # a capture stamp in the future
    assert host_delay(10.0, 10.0 - 2 * timing.PLAUSIBLE_S) is None  # start-up backlog
    assert host_delay(10.5, 10.0) is None  # half a second is already too far
    assert host_delay(0.3, 0.0) is None  # one side missing: no timing, however close
    assert host_delay(0.0, 0.3, playback=True) is None
    assert host_delay(0.5, 0.49) == pytest.approx(0.01)  # a clock that starts near zero


def _blocks(count: int, rng: np.random.Generator, start: float = 100.0):
    """Blocks of a capture stream whose sample 0 was taken at `start`: each arrives 3 ms after
    its last sample plus 0-6 ms of jitter, and the host's delay is exact to +-4 ms."""
    for k in range(count):
        first = k * BLOCK
        taken = start + first / SAMPLE_RATE  # the block's first sample
        arrival = taken + BLOCK / SAMPLE_RATE + 0.003 + rng.uniform(0, 0.006)
        yield first, arrival, arrival - taken + rng.uniform(-0.004, 0.004)


def test_the_median_of_noisy_stamps_finds_when_sample_zero_was_taken():
    rng = np.random.default_rng(1)
    stream = StreamTiming(window=200)
    for i, (first, arrival, delay) in enumerate(_blocks(400, rng)):
        if i < 80:
            delay += 0.4  # the first blocks: a backlog the host misreports
        stream.on_block(first, BLOCK, arrival, delay)
    assert stream.origin() == pytest.approx(100.0, abs=0.001)
    # playback: the stamp says when the block will be heard, later than the callback
    playback = StreamTiming(playback=True)
    for k in range(MIN_BLOCKS):
        playback.on_block(k * BLOCK, BLOCK, 50.0 + k * BLOCK / SAMPLE_RATE, 0.03)
    assert playback.origin() == pytest.approx(50.03)


def _sawtooth(stream: StreamTiming, seconds: int, depth: float, period_s: float) -> None:
    """PulseAudio-like capture stamps of a stream whose sample 0 was taken at 100.0: exact
    right after a timing update, then the reported delay sinks by `depth` over `period_s`
    (the stamps say each sample was taken later than it was), and snaps back."""
    rng = np.random.default_rng(4)
    for first, arrival, delay in _blocks(seconds * SAMPLE_RATE // BLOCK, rng):
        since_update = (first / SAMPLE_RATE) % period_s
        stream.on_block(first, BLOCK, arrival, delay - depth * since_update / period_s)


@pytest.mark.parametrize("seconds", [27, 32, 36])
def test_a_capture_stream_is_read_at_the_top_of_its_stamps_sawtooth(seconds: int):
    running, capture = StreamTiming(), CaptureTiming()
    _sawtooth(running, seconds, 0.008, 9.0)
    _sawtooth(capture, seconds, 0.008, 9.0)
    # the running median lags by where in the sawtooth the stream stopped (3.6-7.1 ms here);
    # the one-second spans kept hold one just after a timing update
    sunk = 0.008 * ((seconds - 1) % 9) / 9  # the last 2 s's median: a second back
    assert running.origin() == pytest.approx(100.0 + sunk, abs=0.001)
    assert capture.origin() == pytest.approx(100.0, abs=0.0015)


def test_a_capture_stream_with_steady_stamps_reads_as_their_median():
    rng = np.random.default_rng(5)
    capture = CaptureTiming()
    for i, (first, arrival, delay) in enumerate(_blocks(3000, rng)):
        if i < 100:
            delay += 0.38  # the first second: a start-up backlog the host misreports
        capture.on_block(first, BLOCK, arrival, delay)
        if i == MIN_BLOCKS - 2:
            assert capture.origin() is None  # too few blocks yet, as the running median
        if i in (299, 999, 1999):  # the backlog's second left out, as by the running median
            assert capture.origin() == pytest.approx(100.0, abs=0.002), i
    assert capture.origin() == pytest.approx(100.0, abs=0.001)  # +-4 ms per block
    assert len(capture._spans) == timing.SPANS  # bounded: only the last ten seconds


def test_a_capture_stream_is_read_at_the_top_of_one_second_of_longer_latency():
    # the stamps say 6 ms more latency for one second (21-22 s) only: that span's median
    rng = np.random.default_rng(7)
    capture = CaptureTiming()
    for first, arrival, delay in _blocks(2400, rng):
        capture.on_block(
            first, BLOCK, arrival, delay + (0.006 if 2100 <= first / BLOCK < 2200 else 0)
        )
    assert capture.origin() == pytest.approx(100.0 - 0.006, abs=0.0015)
    assert not capture.settling


def test_a_capture_stream_leaves_out_exactly_its_first_seconds():
    # the stamps over-read by 5 ms until SETTLE_SPANS seconds in, then are exact
    rng = np.random.default_rng(8)
    capture = CaptureTiming()
    settle = timing.SETTLE_SPANS * timing.SPAN_BLOCKS
    for first, arrival, delay in _blocks(settle + 5 * timing.SPAN_BLOCKS, rng):
        capture.on_block(first, BLOCK, arrival, delay + (0.005 if first / BLOCK < settle else 0))
        if first / BLOCK == settle + timing.SPAN_BLOCKS - 2:
            assert capture.settling  # no span counts yet
    assert not capture.settling
    assert capture.origin() == pytest.approx(100.0, abs=0.001)


@pytest.mark.parametrize("seconds", [20, 30])
def test_a_capture_stream_leaves_out_a_new_streams_settling(seconds: int):
    # PipeWire-like: the stamps over-read by up to 8 ms (at 5 s) while the stream settles,
    # back to exact by 14 s; ten spans back from 20 s would still hold 3.5 ms of it
    rng = np.random.default_rng(6)
    capture = CaptureTiming()
    for first, arrival, delay in _blocks(seconds * SAMPLE_RATE // BLOCK, rng):
        t = first / SAMPLE_RATE
        hump = 0.008 * max(0.0, min(t / 5, (14 - t) / 9))
        capture.on_block(first, BLOCK, arrival, delay + hump)
    assert capture.origin() == pytest.approx(100.0, abs=0.001)


def test_without_stamps_only_the_arrival_jitter_is_known():
    rng = np.random.default_rng(2)
    stream = StreamTiming()
    for first, arrival, _ in _blocks(MIN_BLOCKS - 1, rng):
        stream.on_block(first, BLOCK, arrival, None)
    assert stream.origin() is None and stream.jitter() is None  # too few blocks yet
    for first, arrival, _ in _blocks(300, rng):
        stream.on_block(first, BLOCK, arrival, None)
    assert stream.origin() is None
    assert stream.jitter() == pytest.approx(0.003, abs=0.001)  # median of 0-6 ms minus 0


def test_arrival_jitter_counts_the_window_only_and_blocks_of_any_size():
    stream = StreamTiming()
    end = 0
    for k in range(MIN_BLOCKS):  # blocks of 10 and 30 ms, each arriving as it ends
        frames = BLOCK * (1 + 2 * (k % 2))
        stream.on_block(end, frames, 50.0 + (end + frames) / SAMPLE_RATE, None)
        end += frames
    assert stream.jitter() == pytest.approx(0.0, abs=1e-9)  # MIN_BLOCKS are enough
    early = StreamTiming()
    early.on_block(0, BLOCK, 50.0 - 0.05, None)  # one block 50 ms early, long ago
    for k in range(1, timing.WINDOW + 1):
        early.on_block(k * BLOCK, BLOCK, 50.0 + (k + 1) * BLOCK / SAMPLE_RATE, None)
    assert early.jitter() == pytest.approx(0.0, abs=1e-9)  # out of the window: forgotten


def _mic(monkeypatch: pytest.MonkeyPatch) -> MicSource:
    monkeypatch.setattr(sources, "resolve_input_device", lambda spec: (0, "test mic"))
    mic = MicSource(AudioRing(60 * SAMPLE_RATE), AudioClock())
    mic.stats.granted_latency_s = 0.02
    return mic


def _feed(mic: MicSource, monkeypatch: pytest.MonkeyPatch, stamps: bool, blocks=300) -> None:
    rng = np.random.default_rng(3)
    for _, arrival, delay in _blocks(blocks, rng):
        monkeypatch.setattr(sources, "time", types.SimpleNamespace(monotonic=lambda t=arrival: t))
        info = types.SimpleNamespace(currentTime=0.0, inputBufferAdcTime=0.0)
        if stamps:
            info = types.SimpleNamespace(currentTime=7.0, inputBufferAdcTime=7.0 - delay)
        mic._callback(np.zeros((BLOCK, 1), np.float32), BLOCK, info,
                      types.SimpleNamespace(input_overflow=False))  # fmt: skip


def test_microphone_latency_is_measured_from_its_stream(monkeypatch: pytest.MonkeyPatch):
    mic = _mic(monkeypatch)
    assert mic.measured_latency() == (0.02, "reported")  # nothing captured yet
    _feed(mic, monkeypatch, stamps=True)
    latency, basis = mic.measured_latency()
    # the clock's origin is the earliest arrival: 3 ms (+ a little jitter) after the truth
    assert basis == "timestamps, settling"  # 3 s in: the running median, said so
    assert latency == pytest.approx(mic.clock.origin() - 100.0, abs=0.001)
    assert 0.002 < latency < 0.005 and mic.latency_s == latency


def test_microphone_latency_is_settled_once_its_seconds_count(monkeypatch: pytest.MonkeyPatch):
    mic = _mic(monkeypatch)
    _feed(mic, monkeypatch, stamps=True, blocks=(timing.SETTLE_SPANS + 1) * timing.SPAN_BLOCKS)
    latency, basis = mic.measured_latency()
    assert basis == "timestamps"
    assert latency == pytest.approx(mic.clock.origin() - 100.0, abs=0.001)


def test_microphone_without_host_timing_falls_back_to_arrival_jitter(
    monkeypatch: pytest.MonkeyPatch,
):
    mic = _mic(monkeypatch)
    _feed(mic, monkeypatch, stamps=False)
    latency, basis = mic.measured_latency()
    assert basis == "arrival jitter" and latency == pytest.approx(0.003, abs=0.001)
