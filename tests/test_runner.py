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


def _phases(pipeline, times: list[float]) -> np.ndarray:
    """How far into its frame's due interval each tick fell, in frames."""
    stream = np.array([pipeline.clock.stream_time(t) for t in times])
    return ((stream - pipeline.playout_delay) * FPS) % 1


def test_ticks_lock_to_due_times_and_a_stall_resyncs_without_a_burst(pipeline) -> None:
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
    assert gaps.min() >= runner.MIN_INTERVAL - 1e-9, gaps.round(2)  # never a burst
    # once locked (the third tick), each falls TICK_LAG after a frame is due: a free-running
    # grid would show every frame up to a period later than it may
    locked = [k for k in range(2, len(sent)) if k != 5]  # 5: the first after the stall
    lag = runner.TICK_LAG * FPS
    assert np.allclose(_phases(pipeline, [sent[k] for k in locked]), lag), gaps.round(2)
    assert gaps[4] == pytest.approx(3.5) and gaps[5] == pytest.approx(1.5)  # back on the grid


@pytest.mark.parametrize("frames", [1.3, 2.8])
def test_a_new_playout_delay_relocks_the_ticks_in_one_interval(pipeline, frames: float) -> None:
    fake, sent = pipeline.fake, []
    real_send = pipeline.sink.send

    def send(frame, audio) -> None:
        real_send(frame, audio)
        sent.append(fake.t)
        if len(sent) == 10:
            pipeline.playout_delay += frames / FPS  # due times move off the ticks' grid
        if len(sent) == 20:
            fake.set()

    pipeline.sink.send = send
    pipeline._output()
    gaps = np.diff(sent) / PERIOD
    # the due times moved by a fraction of a period: one longer interval (never a shorter
    # one: the camera never runs faster than its rate), and the ticks are locked again
    shift = frames % 1  # whole frames only re-index the due frames
    expected = np.ones(len(gaps) - 2)
    expected[8] = 1 + shift
    assert np.allclose(gaps[2:], expected), gaps.round(2)
    assert np.allclose(_phases(pipeline, sent[11:]), runner.TICK_LAG * FPS), gaps.round(2)
    assert pipeline.counters.late_ticks == 0


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


class _Worker:
    """Runs the pipeline's generation worker on the fake clock: each wait delivers the audio
    a real-time source would have delivered by then (until `audio_until` stream seconds)."""

    def __init__(self, pipeline, seconds: float, audio_until: float = 1e9, cost: float = 0.0):
        self.p, self.end = pipeline, pipeline.fake.t + seconds
        self.audio = read_audio(JFK)
        self.audio_until, self.cost = audio_until, cost
        self.pushed: list[tuple[int, float, int]] = []  # (frame, due then, ring end then)
        self.generated: list[tuple[list[int], int]] = []  # (frames, due when the call began)
        real_wait, real_push = pipeline.fake.wait, pipeline._push
        real_generate = pipeline.look.engine.generate

        def wait(timeout=None):
            real_wait(timeout)
            self._deliver()
            if pipeline.fake.t >= self.end:
                pipeline.fake.set()
            return pipeline.fake.stopped

        def push(frames, faces, look):
            if len(self.pushed) > 2 * FPS * seconds:  # a worker that never waits spins
                pipeline.fake.set()
                raise AssertionError("more faces than frames: the worker does not wait")
            due = pipeline._due_frame(pipeline.fake.t)
            self.pushed += [(k, due, pipeline.ring.end) for k in frames]
            real_push(frames, faces, look)

        def generate(ring, frames):
            if len(self.generated) > 2 * FPS * seconds:
                pipeline.fake.set()
                raise AssertionError("more engine calls than frames: the worker does not wait")
            self.generated.append((list(frames), pipeline._due_frame(pipeline.fake.t)))
            pipeline.fake.t += self.cost  # the engine call takes this long
            return real_generate(ring, frames)

        pipeline.fake.wait = wait
        pipeline._stop = pipeline.fake
        pipeline._push = push
        pipeline.look.engine.generate = generate

    def _deliver(self) -> None:
        p = self.p
        stream_s = min(p.clock.stream_time(p.fake.t), self.audio_until)
        upto = min(int(stream_s * SAMPLE_RATE) // BLOCK * BLOCK, len(self.audio))
        while p.ring.end + BLOCK <= upto:
            p.ring.write(self.audio[p.ring.end : p.ring.end + BLOCK])
            p.clock.on_block(p.ring.end, p.clock.origin() + p.ring.end / SAMPLE_RATE)

    def run(self) -> _Worker:
        self.p._work()
        return self


def test_worker_generates_every_frame_once_its_audio_is_in(pipeline) -> None:
    w = _Worker(pipeline, 3.0).run()
    frames = [k for k, _, _ in w.pushed]
    assert frames == list(range(frames[0], frames[0] + len(frames)))  # in order, none skipped
    assert len(frames) > 2.5 * FPS and pipeline.counters.frames_silent == 0
    engine = pipeline.look.engine
    assert all(engine.samples_needed(k) <= end for k, _, end in w.pushed)  # never early
    assert all(k > due for k, due, _ in w.pushed)  # and never too late to be shown
    assert pipeline.counters.frames_generated == len(frames)


def test_a_slow_worker_skips_ahead_instead_of_falling_behind(pipeline) -> None:
    w = _Worker(pipeline, 4.0, cost=2.5 * PERIOD).run()  # 2.5 frame times per engine call
    c = pipeline.counters
    assert c.frames_skipped > 0
    assert all(batch[0] > due for batch, due in w.generated)  # never starts on late frames
    assert pipeline.scheduler.mode != Mode("full", 1, 1)  # and the scheduler stepped down
    firsts = [batch[0] for batch, _ in w.generated]
    assert firsts == sorted(firsts) and firsts[-1] > 3 * FPS  # it kept up with the clock


def test_stalled_audio_gives_idle_faces_just_in_time(pipeline) -> None:
    w = _Worker(pipeline, 3.0, audio_until=1.0).run()  # the source stops after 1 s
    c = pipeline.counters
    assert c.frames_generated > 0 and c.frames_silent > FPS
    late = [(k, due) for k, due, _ in w.pushed if k > 1.5 * FPS]
    assert late and all(due < k <= due + 1 for k, due in late)  # idle faces only when due
    assert all(batch[-1] < 1.2 * FPS for batch, _ in w.generated)


def test_muted_gives_only_idle_faces(pipeline) -> None:
    pipeline.muted = True
    w = _Worker(pipeline, 2.0).run()
    assert w.generated == [] and pipeline.counters.frames_silent > FPS
    assert "muted" in " ".join(pipeline.snapshot().warnings)
