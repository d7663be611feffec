"""Audio delivery without a sound card: gap fill, the stalled-microphone reopen, and the hop
track falling behind the ring (explicit times, no sleeps)."""

from __future__ import annotations

import logging
import re
import types

import numpy as np
import pytest

from livecam.audio import sources
from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.sources import GAP_FILL_S, REOPEN_S, RETRY_S, STALL_S, MicSource, deliver
from livecam.constants import BLOCK, HOP_LENGTH, SAMPLE_RATE
from livecam.features.lite import HopTrack, LiteFeatures


def test_a_gap_in_delivery_becomes_silence_so_samples_keep_wall_time() -> None:
    ring, clock = AudioRing(10 * SAMPLE_RATE), AudioClock()
    t0 = 100.0
    for n in range(1, 11):  # 10 blocks on time
        deliver(ring, clock, np.ones(BLOCK, np.float32), t0 + n * BLOCK / SAMPLE_RATE)
    before = ring.end
    # the device stalls for 1.2 s, then delivers one block again
    now = t0 + before / SAMPLE_RATE + 1.2 + BLOCK / SAMPLE_RATE
    deliver(ring, clock, np.ones(BLOCK, np.float32), now)
    gap = round(1.2 * SAMPLE_RATE)
    assert ring.end == before + gap + BLOCK  # the new block lands at its wall-clock sample
    assert not ring.read(before, before + gap).any()  # the gap is silence
    assert ring.read(before + gap, ring.end).all()
    assert clock.origin() == pytest.approx(t0, abs=1e-6)  # the clock did not jump


def test_ordinary_jitter_is_not_filled() -> None:
    ring, clock = AudioRing(SAMPLE_RATE), AudioClock()
    deliver(ring, clock, np.ones(BLOCK, np.float32), 10.0)
    late = 0.9 * GAP_FILL_S  # late, but under the gap threshold
    deliver(ring, clock, np.ones(BLOCK, np.float32), 10.0 + BLOCK / SAMPLE_RATE + late)
    assert ring.end == 2 * BLOCK and ring.read(0, ring.end).all()


class _Stream:
    def __init__(self) -> None:
        self.closed = False

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _FakeDevice:
    """A MicSource on a fake clock whose device opens at once and delivers on demand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.t = 0.0
        self.opened: list[float] = []
        monkeypatch.setattr(sources, "time", types.SimpleNamespace(monotonic=lambda: self.t))
        monkeypatch.setattr(sources, "resolve_input_device", lambda spec: (3, "test mic"))
        fake = self

        def start(mic: MicSource) -> None:  # like the real start, without a device
            fake.opened.append(fake.t)
            mic._stream = _Stream()
            mic._last_block, mic._blocks_at_start = fake.t, mic.stats.blocks

        monkeypatch.setattr(MicSource, "start", start)
        self.mic = MicSource(AudioRing(SAMPLE_RATE), AudioClock())
        self.mic.start()

    def block(self) -> None:
        timing = types.SimpleNamespace(currentTime=0.0, inputBufferAdcTime=0.0)
        self.mic._callback(np.ones((BLOCK, 1), np.float32), BLOCK, timing,
                           types.SimpleNamespace(input_overflow=False))  # fmt: skip

    def at(self, t: float) -> None:
        self.t = t
        self.mic.poll()


def test_a_silent_microphone_is_reported_then_reopened_every_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=sources.__name__)
    device = _FakeDevice(monkeypatch)
    mic, opened, at = device.mic, device.opened, device.at
    first = mic._stream
    device.block()  # it delivered, then stopped
    at(STALL_S * 0.9)
    assert mic.stats.problem == ""
    mic.stats.level_db = -20.0  # the last block's level
    at(STALL_S + 0.1)
    assert "delivered no audio" in mic.stats.problem and opened == [0.0]
    assert mic.stats.level_db == -120.0  # the meter falls, not frozen at the last block
    at(REOPEN_S - 0.1)
    assert opened == [0.0]  # reported, not yet reopened
    at(REOPEN_S + 0.1)
    assert opened == [0.0, REOPEN_S + 0.1] and first.closed
    # still silent: the next try waits for the retry interval, counted from the reopen
    for t in np.arange(REOPEN_S + 0.2, 2 * REOPEN_S + 0.1, 0.25):
        at(float(t))
    assert len(opened) == 2
    said = r"microphone 'test mic' has delivered no audio since \d\d:\d\d:\d\d \(unplugged\?\)"
    assert re.fullmatch(said, mic.stats.problem), mic.stats.problem
    at(2 * REOPEN_S + 0.2)
    assert len(opened) == 3 and opened[2] - opened[1] >= RETRY_S
    device.block()
    at(device.t + 0.1)
    assert mic.stats.problem == "" and mic.stats.blocks == 2
    # one line when it stopped, one when it delivered again: not one per reopen
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "microphone 'test mic' delivers no audio (unplugged?); reopening it every "
                    f"{REOPEN_S:.0f} s until it does"),
        ("INFO", "microphone 'test mic' delivers again"),
    ]  # fmt: skip


def test_a_new_stream_has_until_the_reopen_for_its_first_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = _FakeDevice(monkeypatch)  # PulseAudio's ALSA plugin can take seconds to start
    device.at(REOPEN_S - 0.1)
    assert device.mic.stats.problem == "" and device.opened == [0.0]
    device.at(REOPEN_S + 0.1)
    assert "delivered no audio" in device.mic.stats.problem
    assert device.opened == [0.0, REOPEN_S + 0.1]


def test_a_microphone_unplugged_with_no_input_left_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = _FakeDevice(monkeypatch)
    inputs: list[tuple[int, str]] = []  # unplugged, and it was the only input

    def resolve(spec: str | None) -> tuple[int, str]:
        if not inputs:
            raise sources.NoMicrophone("no microphone found")
        return inputs[0]

    monkeypatch.setattr(sources, "resolve_input_device", resolve)
    for t in np.arange(0.1, REOPEN_S + 0.3, 0.1):
        device.at(float(t))
    mic = device.mic
    assert mic.device_index is None and mic.name == "none"
    assert mic.stats.problem == sources.WAITING
    inputs.append((5, "USB Headset"))  # plugged in again, under a new index
    device.at(device.t + RETRY_S)
    assert (mic.device_index, mic.name, mic.stats.problem) == (5, "USB Headset", "")


def test_hop_track_that_fell_behind_the_ring_resumes_at_its_start() -> None:
    ring = AudioRing(SAMPLE_RATE)
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal(3 * SAMPLE_RATE + 77)).astype(np.float32)
    track = HopTrack(10 * SAMPLE_RATE // HOP_LENGTH)
    track.feed(ring, 0)
    ring.write(audio)  # 3 s arrived, the ring holds only the last 1 s
    track.feed(ring, ring.end)  # no IndexError: it resumes at the ring's oldest hop
    first = -(-ring.start // HOP_LENGTH)
    assert track.hops_done == ring.end // HOP_LENGTH  # hops 0 .. end // HOP_LENGTH - 1
    assert track.get(first - 1) is None  # before the resume point: unknown, never stale
    reference = LiteFeatures()
    reference.restart_at(first)
    expected = reference.push(audio[first * HOP_LENGTH :])
    got = np.array([track.get(h) for h in range(first, first + len(expected))])
    assert len(expected) > 0.9 * SAMPLE_RATE / HOP_LENGTH
    assert np.array_equal(got, expected)  # the same as a stream that started there


def test_a_microphone_that_is_not_there_yet_is_looked_for_every_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(sources, "time", types.SimpleNamespace(monotonic=lambda: clock.t))
    inputs: list[tuple[int, str]] = []  # what PortAudio lists
    looked: list[float] = []

    def resolve(spec: str | None) -> tuple[int, str]:
        looked.append(clock.t)
        if not inputs:
            raise sources.NoMicrophone("no microphone found")
        match = [i for i in inputs if spec is None or spec in i[1]]
        if not match:
            raise sources.AudioDeviceError(f"no microphone matches {spec!r}")
        return match[0]

    opened: list[int] = []

    def start(self) -> None:
        if self.device_index is None:
            return original_start(self)
        opened.append(self.device_index)
        self._stream = _Stream()
        self._last_block = clock.t  # like the real start

    original_start = MicSource.start
    monkeypatch.setattr(sources, "resolve_input_device", resolve)
    monkeypatch.setattr(MicSource, "start", start)
    mic = MicSource(AudioRing(SAMPLE_RATE), AudioClock(), "USB")
    mic.start()  # nothing to open: the pipeline runs on idle frames
    assert mic.name == "none" and mic.stats.problem == sources.WAITING and not opened

    def at(t: float) -> None:
        clock.t = t
        mic.poll()

    for t in np.arange(0.0, 2 * RETRY_S + 0.01, 0.25):
        at(float(t))
    assert looked == [0.0, RETRY_S, 2 * RETRY_S]  # at creation, then every RETRY_S
    inputs.append((1, "Built-in Audio"))  # an input came, but not the one asked for
    at(3 * RETRY_S)
    assert mic.stats.problem == f"no microphone matches 'USB' ({sources.LOOKING})"
    assert not opened
    inputs.append((4, "USB Headset"))
    at(3 * RETRY_S + 0.5)
    assert not opened  # not before the retry interval
    at(4 * RETRY_S)
    assert opened == [4] and mic.name == "USB Headset" and mic.device_index == 4
    # found: from now on the stall check watches it, and it is not looked for again
    at(4 * RETRY_S + STALL_S / 2)
    assert looked[-1] == 4 * RETRY_S and mic.stats.problem == ""
