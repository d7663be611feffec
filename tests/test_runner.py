"""The pipeline's output clock and face buffer, driven on a fake clock (no sleeps, no threads),
and the lite engine's live path against its offline path."""

from __future__ import annotations

import types

import numpy as np
import pytest

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.audio.sources import BLOCK
from livecam.avatar.store import load_avatar
from livecam.constants import SAMPLE_RATE
from livecam.engines.lite import LiteEngine
from livecam.live import LiveOptions, build_pipeline
from livecam.pipeline import runner
from livecam.pipeline.runner import FACE_BUFFER
from livecam.pipeline.scheduler import Mode
from tests.conftest import JFK

FPS = 30
PERIOD = 1 / FPS


class FakeClock:
    """Stands in for the runner's `time` module and its stop event: waiting advances time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.stopped = False

    def monotonic(self) -> float:
        return self.t

    perf_counter = monotonic

    def is_set(self) -> bool:
        return self.stopped

    def set(self) -> None:
        self.stopped = True

    def wait(self, timeout: float | None = None) -> bool:
        self.t += max(timeout or 0.0, 0.0)
        return self.stopped


@pytest.fixture()
def pipeline(monkeypatch: pytest.MonkeyPatch):
    """A lite pipeline with a memory sink; its threads are never started."""
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(
        monotonic=clock.monotonic, perf_counter=clock.perf_counter))  # fmt: skip
    opts = LiveOptions(avatar="astronaut", sink="memory", audio_file=JFK, width=160,
                       height=120, fps=FPS, dashboard=False, idle_motion=False)  # fmt: skip
    p = build_pipeline(opts)
    p._stop = clock
    p.clock.seed(clock.t)
    p.fake = clock
    yield p
    p.sink.close()


def _face(p, value: int) -> np.ndarray:
    return np.full(p.look.avatar.image.shape, value, np.uint8)


def test_face_buffer_is_bounded_and_counts_what_it_drops(pipeline) -> None:
    extra = 5
    n = FACE_BUFFER + extra
    pipeline._push(range(n), [_face(pipeline, k) for k in range(n)], pipeline.look)
    snap = pipeline.snapshot()
    assert snap.queue_depth == FACE_BUFFER == snap.queue_capacity
    assert snap.queue_drops == extra
    index, face, _ = pipeline._take_due(n)
    assert index == n - 1 and face[0, 0, 0] == n - 1  # the newest face wins
    assert pipeline.snapshot().queue_depth == 0
    pipeline._push([n], [_face(pipeline, 0)], pipeline.look)
    assert pipeline._take_due(n - 1) is None  # a face is never shown before its tick


def test_new_held_and_repeated_frames_are_counted_apart(pipeline) -> None:
    c, now = pipeline.counters, pipeline.fake.t
    pipeline.scheduler.mode = Mode("full", 2, 1)  # a mouth every 2nd frame
    pipeline._push([0], [_face(pipeline, 1)], pipeline.look)
    pipeline._show(0, now)
    pipeline._show(1, now)  # between strided frames: the mouth holds
    pipeline._show(2, now)  # frame 2 was due but never came: a repeat
    assert (c.frames_new, c.frames_held, c.frames_repeated) == (1, 1, 1)
    pipeline._push([4], [_face(pipeline, 2)], pipeline.look)
    pipeline._show(5, now)  # a late face is shown, but it is not frame 5's
    assert (c.frames_new, c.frames_held, c.frames_repeated) == (1, 1, 2)
    pipeline.scheduler.mode = Mode("full", 1, 1)
    pipeline._push([6], [_face(pipeline, 3)], pipeline.look)
    pipeline._show(6, now)
    pipeline._show(7, now)  # stride 1: nothing to hold between
    assert (c.frames_new, c.frames_held, c.frames_repeated) == (2, 1, 3)
    assert c.frames_shown == 6 == pipeline.sink.frames_sent


def test_a_late_tick_resyncs_instead_of_bursting(pipeline) -> None:
    fake, sent = pipeline.fake, []
    real_send = pipeline.sink.send

    def send(frame, audio) -> None:
        real_send(frame, audio)
        sent.append(fake.t)
        if len(sent) == 5:
            fake.t += 3.5 * PERIOD  # the sink stalls for three and a half frames
        if len(sent) == 15:
            fake.set()

    pipeline.sink.send = send
    pipeline._output()
    gaps = np.diff(sent) / PERIOD
    assert pipeline.counters.late_ticks == 1
    # the frame after the stall goes out when it ends, then the regular pace: no burst
    expected = np.ones(len(gaps))
    expected[4] = 3.5
    assert np.allclose(gaps, expected), gaps.round(2)


def test_live_and_offline_lite_frames_are_identical() -> None:
    """The same audio gives the same faces whether it arrives block by block (live, frames
    generated as soon as their audio is in, in varying batches) or all at once (render)."""
    avatar = load_avatar("astronaut")
    audio = read_audio(JFK)[: 2 * SAMPLE_RATE]
    n = 2 * FPS - 2
    offline_engine, live_engine = LiteEngine(avatar, FPS), LiteEngine(avatar, FPS)
    full = AudioRing(len(audio) + SAMPLE_RATE)
    full.write(audio)
    full.write(np.zeros(SAMPLE_RATE, np.float32))
    offline = offline_engine.generate(full, range(n))

    ring, live, pos = AudioRing(SAMPLE_RATE), [], 0
    batches = iter([1, 2, 4, 1, 3] * 20)
    while len(live) < n:
        frames = list(range(len(live), min(n, len(live) + next(batches))))
        while live_engine.samples_needed(frames[-1]) > ring.end:
            ring.write(audio[pos : pos + BLOCK])
            pos += BLOCK
        live += live_engine.generate(ring, frames)
    assert all(np.array_equal(a, b) for a, b in zip(live, offline, strict=True))
    opened = [offline_engine.mouth(k)[0] for k in range(n)]
    assert max(opened) > 0.3  # speech: the faces differ from frame to frame
