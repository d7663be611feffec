"""The pipeline's output clock and face buffer, driven on a fake clock (no sleeps, no threads),
and the lite engine's live path against its offline path."""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
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
from livecam.pipeline.runner import FACE_BUFFER, MARGIN_S, Look
from livecam.pipeline.scheduler import Mode
from livecam.pipeline.stats import Snapshot
from livecam.session import build_compositor
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
        assert timeout is not None, "a pipeline thread would wait forever"
        self.t += max(timeout, 0.0)
        return self.stopped


def _options(idle_motion: bool = False) -> LiveOptions:
    return LiveOptions(avatar="astronaut", sink="memory", audio_file=JFK, width=160,
                       height=120, fps=FPS, dashboard=False, idle_motion=idle_motion)  # fmt: skip


def _fake_pipeline(monkeypatch: pytest.MonkeyPatch, idle_motion: bool = False):
    """A lite pipeline with a memory sink on a fake clock; its threads are never started."""
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(
        monotonic=clock.monotonic, perf_counter=clock.perf_counter))  # fmt: skip
    p = build_pipeline(_options(idle_motion))
    p._stop = clock
    p.clock.seed(clock.t)
    p.fake = clock
    return p


@pytest.fixture()
def pipeline(monkeypatch: pytest.MonkeyPatch):
    p = _fake_pipeline(monkeypatch)
    yield p
    p.sink.close()


@pytest.fixture()
def moving(monkeypatch: pytest.MonkeyPatch):
    """As `pipeline`, with idle motion: each frame index frames the head differently."""
    p = _fake_pipeline(monkeypatch, idle_motion=True)
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


def _run_output(pipeline, frames: int, after_send=lambda count: None) -> list[float]:
    """Run the output loop on the fake clock for `frames` frames; `after_send(count)` runs
    after each frame reaches the sink (a stall, a new delay). The times they were sent."""
    sent, real_send = [], pipeline.sink.send

    def send(frame, audio) -> None:
        real_send(frame, audio)
        sent.append(pipeline.fake.t)
        after_send(len(sent))
        if len(sent) == frames:
            pipeline.fake.set()

    pipeline.sink.send = send
    pipeline._output()
    return sent


def test_a_stall_of_over_a_period_is_a_late_tick_and_a_shorter_one_is_not(pipeline) -> None:
    # after frame 3 the next tick goes out half a period late, after frame 6 one and a half
    # periods late (under two)
    stalls = {3: 1.5 * PERIOD, 6: 2.5 * PERIOD}

    def stall(count: int) -> None:
        pipeline.fake.t += stalls.get(count, 0.0)

    _run_output(pipeline, 10, stall)
    assert pipeline.counters.late_ticks == 1


def test_an_unknown_kind_of_shown_frame_is_refused(pipeline) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        pipeline.counters.count_shown("skipped")
    assert pipeline.counters.shown_counts() == (0, 0, 0, 0)


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


def test_a_strided_mouth_holds_wherever_it_is_in_the_stream(pipeline) -> None:
    c, now = pipeline.counters, pipeline.fake.t
    pipeline.scheduler.mode = Mode("full", 3, 1)
    pipeline._push([30], [_face(pipeline, 1)], pipeline.look)
    for due in (30, 31, 32, 33):
        pipeline._show(due, now)
    assert (c.frames_new, c.frames_held, c.frames_repeated) == (1, 2, 1)


def test_show_composes_the_due_frame_times_its_stages_and_calls_its_hooks(moving) -> None:
    p, fake = moving, moving.fake
    compose, send = p.compositor.compose, p.sink.send

    def slow_compose(face, k):
        fake.t += 0.003
        return compose(face, k)

    def slow_send(frame, audio) -> None:
        fake.t += 0.007
        send(frame, audio)

    p.compositor.compose, p.sink.send = slow_compose, slow_send
    frames, ticks = [], []
    p.on_frame, p.on_tick = frames.append, lambda index, now: ticks.append((index, now))
    face = p.engine.generate_silent([10])[0]
    p._push([10], [face], p.look)
    origin, shows = p.clock.origin(), []
    for due in (10, 11, 40):  # frame 10 new, then repeated under a moving head
        now = origin + due * PERIOD + 0.1
        p._show(due, now)
        shows.append(now)
    assert ticks == [(10, now) for now in shows]  # the face shown and when
    assert len(frames) == 3 == p.sink.frames_sent
    for due, frame in zip((10, 11, 40), frames, strict=True):
        assert np.array_equal(frame, compose(face, due))
    assert not np.array_equal(frames[0], frames[2])  # the head moved
    stages = p.counters.stage_percentiles()
    assert stages["compose"] == pytest.approx((3.0, 3.0))
    assert stages["sink"] == pytest.approx((7.0, 7.0))
    latency = [now - origin - 10 * PERIOD for now in shows]  # frame 10's age when shown
    assert stages["latency"] == pytest.approx(tuple(np.percentile(latency, [50, 95]) * 1e3))
    fake.t = shows[-1]
    assert p.snapshot().shown_fps == pytest.approx(2 / (shows[-1] - shows[0]))


def test_the_idle_face_before_any_generated_one_is_framed_for_its_tick(moving) -> None:
    p, frames, ticks, asked = moving, [], [], []
    p.on_frame, p.on_tick = frames.append, lambda index, now: ticks.append(index)
    silent = p.engine.generate_silent
    p.look.engine.generate_silent = lambda ks: asked.append(list(ks)) or silent(ks)
    p._show(-3, p.fake.t)  # before the stream's first frame is due
    p._show(5, p.fake.t)  # the idle face stays, the head moves on
    assert asked == [[0]]  # frame 0's idle face (a video avatar's first frame)
    idle = silent([0])[0]
    assert ticks == [-3, -3]
    assert np.array_equal(frames[0], p.compositor.compose(idle, -3))
    assert np.array_equal(frames[1], p.compositor.compose(idle, 5))
    p._shown = None  # nothing shown yet, the stream under way: that frame's idle face
    p._show(7, p.fake.t)
    assert asked[-1] == [7] and ticks[-1] == 7


def _phases(pipeline, times: list[float]) -> np.ndarray:
    """How far into its frame's due interval each tick fell, in frames."""
    stream = np.array([pipeline.clock.stream_time(t) for t in times])
    return ((stream - pipeline.playout_delay) * FPS) % 1


def test_ticks_lock_to_due_times_and_a_stall_resyncs_without_a_burst(pipeline) -> None:
    fake, ticks = pipeline.fake, []

    def stall(count: int) -> None:
        if count in (5, 10):
            fake.t += 3.5 * PERIOD  # the sink stalls for three and a half frames

    pipeline.on_tick = lambda index, now: ticks.append((index, now))
    sent = _run_output(pipeline, 15, stall)
    gaps = np.diff(sent) / PERIOD
    assert pipeline.counters.late_ticks == 2
    assert gaps.min() >= runner.MIN_INTERVAL - 1e-9, gaps.round(2)  # never a burst
    # once locked (the second tick), each falls TICK_LAG after a frame is due: a free-running
    # grid would show every frame up to a period later than it may
    locked = [k for k in range(1, len(sent)) if k not in (5, 10)]  # 5, 10: after a stall
    lag = runner.TICK_LAG * FPS
    assert np.allclose(_phases(pipeline, [sent[k] for k in locked]), lag), gaps.round(2)
    for k in (4, 9):  # the frame after a stall goes out when it ends, then back on the grid
        assert gaps[k] == pytest.approx(3.5) and gaps[k + 1] == pytest.approx(1.5)
    # each tick shows the frame due at its time (here the first idle face throughout)
    assert ticks == [(pipeline._due_frame(sent[0]), t) for t in sent]
    recent = [t for t in sent if t > fake.t - 2.0]  # the rate meter's window
    rate = (len(recent) - 1) / (recent[-1] - recent[0])
    assert pipeline.snapshot().shown_fps == pytest.approx(rate)


def test_how_late_frames_reach_the_sink_is_measured_and_joins_the_delays(pipeline) -> None:
    fake, compose = pipeline.fake, pipeline.compositor.compose
    base = pipeline.audio_delay_s() - pipeline.send_lag_s
    assert pipeline.send_lag_s == runner.TICK_LAG  # assumed until frames have gone out

    def slow_compose(face, index):
        fake.t += 0.004  # compositing takes 4 ms on this machine
        return compose(face, index)

    def stall(count: int) -> None:
        if count % 10 == 0:
            fake.t += 0.5 * PERIOD  # a rare late tick does not move the median

    pipeline.compositor.compose = slow_compose
    _run_output(pipeline, runner.SEND_LAGS + 30, stall)
    assert pipeline.send_lag_s == pytest.approx(runner.TICK_LAG + 0.004)
    assert pipeline.audio_delay_s() == pytest.approx(base + runner.TICK_LAG + 0.004)
    assert pipeline.latency_s() == pytest.approx(pipeline.source.latency_s + base + 0.006)
    assert len(pipeline._send_lags) == runner.SEND_LAGS  # bounded


@pytest.mark.parametrize("jump", [-150, 150])
def test_a_clock_that_re_anchors_between_two_readings_neither_stalls_nor_bursts(
    pipeline, jump: int
) -> None:
    now = pipeline.fake.t
    due = pipeline._due_frame(now) + jump  # read before the clock moved by 5 s either way
    ahead = (pipeline._next_tick(due, now) - now) / PERIOD
    assert runner.MIN_INTERVAL - 1e-9 <= ahead <= 2 + 1e-9


@pytest.mark.parametrize("frames", [1.3, 2.8])
def test_a_new_playout_delay_relocks_the_ticks_in_one_interval(pipeline, frames: float) -> None:
    def shift(count: int) -> None:
        if count == 10:
            pipeline.playout_delay += frames / FPS  # due times move off the ticks' grid

    sent = _run_output(pipeline, 20, shift)
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

    def __init__(self, pipeline, seconds: float, audio_until: float = 1e9, cost: float = 0.0,
                 hiccups: tuple[tuple[float, float], ...] = (), mute_at: float = 1e9):  # fmt: skip
        self.p, self.end = pipeline, pipeline.fake.t + seconds
        self.audio = read_audio(JFK)
        self.audio_until, self.cost = audio_until, cost
        # (stream second, seconds): the worker thread is descheduled this long at that time
        self.hiccups = sorted(hiccups)
        self.mute_at = mute_at  # stream second at which the user mutes
        self.pushed: list[tuple[int, float, int]] = []  # (frame, due then, ring end then)
        self.looks: list = []  # the look each pushed face carries
        self.generated: list[tuple[list[int], int]] = []  # (frames, due when the call began)
        real_wait, real_push = pipeline.fake.wait, pipeline._push
        real_generate = pipeline.look.engine.generate

        def wait(timeout=None):
            real_wait(timeout)
            stream_s = pipeline.clock.stream_time(pipeline.fake.t)
            if self.hiccups and stream_s >= self.hiccups[0][0]:
                pipeline.fake.t += self.hiccups.pop(0)[1]
            if stream_s >= self.mute_at:
                pipeline.muted = True
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
            self.looks += [look] * len(frames)
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
    assert frames == list(range(len(frames)))  # from the stream's first frame, none skipped
    assert len(frames) > 2.5 * FPS and pipeline.counters.frames_silent == 0
    engine = pipeline.look.engine
    assert all(engine.samples_needed(k) <= end for k, _, end in w.pushed)  # never early
    # nor later than the capture block that completes its audio
    assert all(end < engine.samples_needed(k) + BLOCK for k, _, end in w.pushed)
    assert all(k > due for k, due, _ in w.pushed)  # and never too late to be shown
    assert pipeline.counters.frames_generated == len(frames)
    assert pipeline.counters.frames_skipped == 0
    assert all(look is pipeline.look for look in w.looks)


def test_a_slow_worker_skips_ahead_instead_of_falling_behind(pipeline, caplog) -> None:
    caplog.set_level("INFO", logger=runner.__name__)
    w = _Worker(pipeline, 4.0, cost=2.5 * PERIOD).run()  # 2.5 frame times per engine call
    c = pipeline.counters
    assert c.frames_skipped > 0
    assert all(batch[0] > due for batch, due in w.generated)  # never starts on late frames
    mode = pipeline.scheduler.mode
    assert mode != Mode("full", 1, 1)  # and the scheduler stepped down
    firsts = [batch[0] for batch, _ in w.generated]
    assert firsts == sorted(firsts) and firsts[-1] > 3 * FPS  # it kept up with the clock
    # the log names the mode it stepped to and the delay that goes with it
    assert pipeline.playout_delay == pipeline.scheduler.playout_delay
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scheduler")]
    assert changes[-1] == (
        f"scheduler: tier {mode.tier}, every {mode.stride}. frame, batch {mode.batch}, "
        f"playout delay {pipeline.playout_delay * 1e3:.0f} ms"
    )


class _RoundTrips:
    """Makes the pipeline's engine a pipelined one (a remote engine's shape) whose calls are
    answered `rtt` after they are sent, costing `busy` of this machine's time each. Calls
    sent while `held` = (from, until) (fake clock) are answered a round trip after `until`
    at the earliest: a lost packet holds up the replies behind it until it is resent."""

    def __init__(self, worker: _Worker, rtt: float, busy: float = 0.001,
                 held: tuple[float, float] = (0.0, 0.0), fastest: float = 0.0,
                 measured: bool = True) -> None:  # fmt: skip
        """measured: the round trip is known from the start (else from the first reply)."""
        self.p, self.rtt, self.busy, self.held = worker.p, rtt, busy, held
        self.in_flight: list[float] = []  # answer times of the calls not yet collected
        self.answered: list[float] = []  # when collected
        self.most = 0  # calls in flight at once, at most
        self.sent: list[tuple[list[int], float, str]] = []  # (frames, time, engine tier) a call
        engine = self.p.look.engine
        engine.submit = self.submit
        # as the remote engine: the fastest recent round trip
        engine.round_trip_s = lambda: (fastest or rtt) if measured or self.answered else None
        engine.follow_server = lambda: False  # its server runs what it planned with

    def submit(self, ring, frames):
        engine, now = self.p.look.engine, self.p.fake.t
        self.sent.append((list(frames), now, engine.tier))
        faces = engine.generate(ring, frames)  # (the worker's recording wrapper)
        answer_at = now + self.rtt
        if self.held[0] <= now < self.held[1]:
            answer_at = max(answer_at, self.held[1] + self.rtt)
        self.in_flight.append(answer_at)
        self.most = max(self.most, len(self.in_flight))
        return _FakeCall(self, faces, answer_at)


class _FakeCall:
    def __init__(self, trips: _RoundTrips, faces, answer_at: float) -> None:
        self.trips, self.faces, self.answer_at, self.busy_s = trips, faces, answer_at, trips.busy

    def wait(self, timeout: float):
        clock = self.trips.p.fake
        left = self.answer_at - clock.t
        if left > timeout:
            clock.wait(timeout)
            return None
        clock.wait(max(left, 0.0))
        self.trips.in_flight.remove(self.answer_at)
        self.trips.answered.append(clock.t)
        return self.faces


def test_round_trips_overlap_so_every_frame_is_generated(monkeypatch) -> None:
    """A 200 ms round trip (a remote engine over a slow network): calls go out as their audio
    arrives, several in flight, and every frame still gets its own face; the playout delay
    covers the round trip. One call at a time could make at most 5 calls a second."""
    rtt = 0.2
    runs = {}
    for pipelined in (True, False):
        p = _fake_pipeline(monkeypatch)
        worker = _Worker(p, 5.0, cost=0.0 if pipelined else rtt)
        trips = _RoundTrips(worker, rtt) if pipelined else None
        worker.run()
        runs[pipelined] = (p, worker, trips)
        p.sink.close()
    p, worker, trips = runs[True]
    frames = [k for k, _, _ in worker.pushed]
    late = frames[frames.index(next(k for k in frames if k > 2 * FPS)) :]  # once settled
    assert late == list(range(late[0], late[-1] + 1))  # every frame, none skipped
    assert p.scheduler.mode.stride == 1
    assert trips.most >= rtt * FPS  # a round trip's worth of calls out at once
    # the delay covers the round trip as the calls measured it (the fastest, and 10 % more
    # of their p95's excess over it), not more: a reply is collected within 20 ms of its
    # arrival, the longest the worker waits on it
    s = p.scheduler
    floor = s.base_delay_s + s._batch_wait(s.mode) + rtt
    assert floor - 1e-9 <= p.playout_delay <= floor + 1.1 * 0.02
    assert all(k > due for k, due, _ in worker.pushed[-FPS:])  # faces arrive before they are due
    assert all(look is p.look for look in worker.looks)
    # the same round trip, one call at a time: the scheduler has to skip frames
    serial, _, _ = runs[False]
    assert serial.scheduler.mode.stride > 1


def test_round_trips_slower_than_the_fastest_still_give_every_frame_a_face(pipeline) -> None:
    """The engine asks for as many calls as its fastest round trip holds (100 ms: 3), and
    they take 150 ms (jitter): still one call a frame, every frame on time."""
    pipeline.scheduler.observe = lambda mode, seconds, **_: False  # every frame, batch 1
    pipeline.playout_delay = pipeline._base_delay() + 0.15 + 0.02  # covers the round trip
    worker = _Worker(pipeline, 4.0)
    _RoundTrips(worker, 0.15, fastest=0.1)
    worker.run()
    frames = [k for k, _, _ in worker.pushed]
    assert frames == list(range(frames[-1] + 1))  # each frame got a face
    assert pipeline.counters.frames_skipped == 0
    assert all(k > due for k, due, _ in worker.pushed)  # and before its tick


def test_calls_held_up_behind_a_lost_packet_do_not_hold_back_the_next_ones(pipeline) -> None:
    """For 300 ms every reply waits for a resent packet (a 200 ms round trip later): the
    calls after them still go out one per frame, not in a burst once the held-up ones are
    answered; the held-up faces come after their tick and are counted."""
    rtt, t0 = 0.2, pipeline.fake.t
    pipeline.scheduler.observe = lambda mode, seconds, **_: False  # every frame, batch 1
    pipeline.playout_delay = pipeline._base_delay() + rtt + 0.02  # covers the round trip
    worker = _Worker(pipeline, 4.0)
    trips = _RoundTrips(worker, rtt, held=(t0 + 2.0, t0 + 2.3))
    worker.run()
    sent = np.array([t for _, t, _ in trips.sent]) - t0
    during = sent[(sent >= 2.0) & (sent < 2.3 + rtt)]
    assert len(during) >= 0.9 * (0.3 + rtt) * FPS  # a call per frame all along
    # never more at once than one capture block's audio completes
    assert max(np.unique(sent, return_counts=True)[1]) <= math.ceil(BLOCK / SAMPLE_RATE * FPS)
    late = [k for k, due, _ in worker.pushed if k <= due]
    assert len(late) >= 0.2 * FPS  # held-up ones (the mouth before them stayed on)
    assert pipeline.counters.frames_late == len(late)
    frames = [k for k, _, _ in worker.pushed]
    assert frames == list(range(frames[0], frames[-1] + 1))  # each frame still got a face
    assert all(k > due for k, due, _ in worker.pushed[-FPS:])  # on time again


def test_an_engine_whose_server_runs_another_plan_is_planned_afresh(
    pipeline, caplog, monkeypatch
) -> None:
    """A remote engine starts on the local plan (its server unreachable) and reaches a server
    that runs another engine after a second: from then on the scheduler steps that engine's
    tiers, calls wait for its longer look-ahead, the delay covers it, and the calls planned
    before it are shown but not taken as its cost."""
    caplog.set_level("INFO", logger=runner.__name__)
    worker = _Worker(pipeline, 3.0)
    trips = _RoundTrips(worker, 0.05)
    engine, before = pipeline.look.engine, pipeline.scheduler
    local_needed, extra = engine.samples_needed, SAMPLE_RATE // 10  # 100 ms more look-ahead
    reached_at = pipeline.fake.t + 1.0

    def follow_server() -> bool:
        if pipeline.fake.t < reached_at or engine.tiers[0] == "nearest":
            return False
        engine.tiers, engine.batch_sizes = ("nearest", "full"), (1, 2)
        engine.samples_needed = lambda k: local_needed(k) + extra
        return True

    engine.follow_server = follow_server
    submit, sent = engine.submit, []

    def spy(ring, frames):
        sent.append((frames[-1], ring.end, pipeline.fake.t))
        return submit(ring, frames)

    engine.submit = spy
    observed, delays = [], []

    class Recording(runner.Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            delays.append(self.playout_delay)

        def observe(self, mode, seconds, **kwargs):
            observed.append(mode)
            return super().observe(mode, seconds, **kwargs)

    monkeypatch.setattr(runner, "Scheduler", Recording)
    worker.run()
    after = pipeline.scheduler
    assert after is not before and after.tiers == ("nearest", "full")
    assert after.batch_sizes == (1, 2)
    assert after.base_delay_s == pytest.approx(before.base_delay_s + 0.1)
    assert pipeline.playout_delay >= after.base_delay_s
    late_calls = [(k, end) for k, end, t in sent if t >= reached_at]
    assert len(late_calls) > FPS  # it went on calling, at the new engine's tier,
    assert {tier for _, t, tier in trips.sent if t >= reached_at} == {"nearest"}
    assert all(end >= engine.samples_needed(k) for k, end in late_calls)  # with its audio in
    answered = list(zip(trips.sent, trips.answered, strict=False))  # the last ones unanswered
    assert any(t < reached_at <= done for (_, t, _), done in answered)
    # the new scheduler learnt only from the calls it planned
    assert len(observed) == sum(1 for (_, t, _), _ in answered if t >= reached_at)
    frames = [k for k, _, _ in worker.pushed]
    assert frames == sorted(frames) and frames[-1] > 2.5 * FPS
    (delay,) = delays
    assert (
        f"generating with lite: tiers nearest, full, playout delay {delay * 1e3:.0f} ms from now"
        in caplog.messages
    )


def test_before_the_first_reply_one_call_at_a_time(pipeline) -> None:
    """A generator that takes half a second a call: until its first reply tells what a call
    costs, no second call goes out (one a frame would queue 15 there); then they overlap."""
    pipeline.scheduler.observe = lambda mode, seconds, **_: False  # every frame, batch 1
    worker = _Worker(pipeline, 2.0)
    trips = _RoundTrips(worker, 0.5, measured=False)
    worker.run()
    (_, first, _), (_, second, _) = trips.sent[:2]
    assert second >= trips.answered[0] == pytest.approx(first + 0.5, abs=0.02)
    assert trips.most > 1  # once the round trip is known


def test_a_call_goes_out_as_soon_as_its_audio_is_in_at_the_modes_tier(pipeline) -> None:
    """With room for another call, a batch is sent within 2 ms (the worker's shortest wait)
    of the capture block that completes its audio, even while it waits on earlier replies;
    and at the scheduler's tier."""
    pipeline.scheduler.observe = lambda mode, seconds, **_: False  # keep the mode
    pipeline.scheduler.mode = Mode("nearest", 1, 2)
    pipeline.playout_delay = 0.25  # covers the round trip: no frame is skipped
    worker = _Worker(pipeline, 3.0)
    trips = _RoundTrips(worker, rtt=0.15)
    pipeline.look.engine.round_trip_s = lambda: 60.0  # room for any number of calls
    worker.run()
    engine, origin = pipeline.look.engine, pipeline.clock.origin()
    assert len(trips.sent) > 1.2 * FPS  # two frames a call for 3 s, less the start
    assert [k for frames, _, _ in trips.sent for k in frames] == list(range(2 * len(trips.sent)))
    for frames, sent, tier in trips.sent:
        completed = -(-engine.samples_needed(frames[-1]) // BLOCK) * BLOCK  # its block's end
        assert 0 <= sent - (origin + completed / SAMPLE_RATE) <= 0.002 + 1e-9, frames
        assert tier == "nearest"
    assert trips.most > 1  # while earlier calls were still out


def test_room_for_a_call_at_the_modes_pace_up_to_the_cap(pipeline) -> None:
    """Room while no more calls went out in the last round trip (the calls the engine wants,
    a mode's period each) than it wants: one more catches up after a late one. Calls out for
    longer (held up) do not count; the cap holds whatever the engine asks for."""
    engine = pipeline.look.engine
    mode = Mode("full", 2, 3)  # every 2nd frame, 3 frames a call: a call every 6 frames
    period, now = 6 / FPS, pipeline.fake.t

    def out(*periods_ago: float) -> collections.deque:  # calls sent then, not answered yet
        return collections.deque(
            runner.InFlight(
                range(1), mode, pipeline.look, None, now - p * period, pipeline.scheduler
            )
            for p in periods_ago
        )

    assert not pipeline._room_for_a_call(engine, mode, out())  # a plain engine is called
    _RoundTrips(_Worker(pipeline, 1.0), rtt=0.1)
    engine.round_trip_s = lambda: 2.5 * period  # 3 periods' calls out
    assert pipeline._room_for_a_call(engine, mode, out(0, 1, 2))  # one more to catch up
    assert not pipeline._room_for_a_call(engine, mode, out(0, 0.5, 1, 2))
    assert pipeline._room_for_a_call(engine, mode, out(0, 1, 2, 3.5))  # held up since
    engine.round_trip_s = lambda: 0.1 * period  # a fast network: one a period
    assert pipeline._room_for_a_call(engine, mode, out(0.5, 2))
    assert not pipeline._room_for_a_call(engine, mode, out(0, 0.5))
    engine.round_trip_s = lambda: None  # before the first reply: one at a time
    assert pipeline._room_for_a_call(engine, mode, out())
    assert not pipeline._room_for_a_call(engine, mode, out(3))
    engine.round_trip_s = lambda: 50 * period  # whatever the round trip
    assert pipeline._room_for_a_call(engine, mode, out(*[0] * (runner.MAX_IN_FLIGHT - 1)))
    assert not pipeline._room_for_a_call(engine, mode, out(*[0] * runner.MAX_IN_FLIGHT))


def test_a_descheduled_worker_skips_and_counts_exactly_the_late_frames(pipeline) -> None:
    pipeline.scheduler.observe = lambda mode, seconds, **_: False  # keep every frame, batch 1
    hiccups = ((1.0, 10 * PERIOD), (2.0, 7.5 * PERIOD))
    w = _Worker(pipeline, 3.0, hiccups=hiccups).run()
    frames = [k for k, _, _ in w.pushed]
    missing = sorted(set(range(frames[-1])) - set(frames))
    assert len(missing) >= 2 * 6  # both hiccups cost frames (more than the playout delay)
    assert pipeline.counters.frames_skipped == len(missing)
    # after each gap the worker goes on with the first frame that can still be shown
    for k, due, _ in w.pushed:
        if k - 1 in missing:
            assert k == due + 1


def test_a_strided_batched_mode_generates_every_nth_frame_in_batches(pipeline) -> None:
    scheduler = pipeline.scheduler
    scheduler.mode = Mode("full", 2, 2)
    scheduler._derive_delay()  # the delay that covers this mode's batch wait
    pipeline.playout_delay = scheduler.playout_delay
    scheduler.observe = lambda mode, seconds, **_: False
    w = _Worker(pipeline, 2.0).run()
    assert len(w.generated) > FPS / 4
    for batch, _ in w.generated:
        assert batch[0] % 2 == 0 and batch == [batch[0], batch[0] + 2]


def test_stalled_audio_gives_idle_faces_just_in_time(pipeline) -> None:
    w = _Worker(pipeline, 3.0, audio_until=1.0).run()  # the source stops after 1 s
    c = pipeline.counters
    assert c.frames_generated > 0 and c.frames_silent > FPS
    late = [(k, due) for k, due, _ in w.pushed if k > 1.5 * FPS]
    assert late and all(due < k <= due + 1 for k, due in late)  # idle faces only when due
    assert all(batch[-1] < 1.2 * FPS for batch, _ in w.generated)
    frames = [k for k, _, _ in w.pushed]
    idle = frames[c.frames_generated :]  # after the stall grace, a face for every frame
    assert len(idle) == c.frames_silent and idle == list(range(idle[0], idle[-1] + 1))
    assert c.frames_skipped == idle[0] - frames[c.frames_generated - 1] - 1  # only the grace
    assert all(look is pipeline.look for look in w.looks)


def test_muting_while_waiting_for_a_batch_gives_idle_faces_without_a_gap(pipeline) -> None:
    scheduler = pipeline.scheduler
    scheduler.mode = Mode("full", 2, 4)  # a batch's audio takes 8 frames to arrive
    scheduler._derive_delay()
    pipeline.playout_delay = scheduler.playout_delay
    scheduler.observe = lambda mode, seconds, **_: False
    w = _Worker(pipeline, 3.0, mute_at=1.5).run()
    c = pipeline.counters
    assert c.frames_generated and c.frames_silent > FPS / 2
    assert c.frames_skipped == 0  # the worker noticed at once: every idle face in time
    frames = [k for k, _, _ in w.pushed]
    assert frames == list(range(0, frames[-1] + 1, 2))


def test_muted_gives_only_idle_faces(pipeline) -> None:
    pipeline.muted = True
    w = _Worker(pipeline, 2.0).run()
    assert w.generated == [] and pipeline.counters.frames_silent > FPS
    assert "muted" in " ".join(pipeline.snapshot().warnings)


def test_an_engine_returning_the_wrong_number_of_faces_is_an_error(pipeline) -> None:
    with pytest.raises(ValueError):
        pipeline._push(range(3), [_face(pipeline, 0)] * 2, pipeline.look)


def test_generate_sets_the_tier_and_times_each_frame(pipeline) -> None:
    p, fake = pipeline, pipeline.fake
    generate = p.engine.generate

    def slow(ring, frames):
        fake.t += 0.03  # one call for three frames
        return generate(ring, frames)

    p.look.engine.generate = slow
    p.ring.write(read_audio(JFK)[:SAMPLE_RATE])
    p._generate(range(3), Mode("nearest", 1, 3), p.look)
    assert p.engine.tier == "nearest"
    assert p.counters.stage_percentiles()["generate"] == pytest.approx((10.0, 10.0))
    assert p.counters.frames_generated == 3
    index, _, look = p._take_due(2)
    assert index == 2 and look is p.look


def test_the_sink_gets_the_audio_of_each_frame_shown_once(pipeline) -> None:
    p, per_frame = pipeline, SAMPLE_RATE / FPS
    audio = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    p.ring.write(audio)

    def span(a: float, b: float) -> np.ndarray:
        return audio[round(a * per_frame) : round(b * per_frame)]

    assert np.array_equal(p._audio_until(3), span(3, 4))  # the recording starts here
    assert np.array_equal(p._audio_until(4), span(4, 5))
    assert np.array_equal(p._audio_until(6), span(5, 7))  # a skipped tick's audio too
    again = p._audio_until(6)  # a repeated tick: no audio twice
    assert again.size == 0 and again.dtype == np.float32
    assert np.array_equal(p._audio_until(40), audio[round(7 * per_frame) :])  # all there is


def test_audio_before_the_stream_is_silence(pipeline) -> None:
    p, per_frame = pipeline, SAMPLE_RATE / FPS
    p.ring.write(np.ones(SAMPLE_RATE, np.float32))
    first = p._audio_until(-3)  # the playout delay: the first frames shown precede the stream
    assert first.size == round(-2 * per_frame) - round(-3 * per_frame) and not first.any()
    rest = p._audio_until(1)
    assert rest.size == round(2 * per_frame) - round(-2 * per_frame)
    assert not rest[: round(2 * per_frame)].any() and rest[round(2 * per_frame) :].all()


def test_audio_the_ring_no_longer_holds_is_skipped(pipeline) -> None:
    p = pipeline
    p.ring.write(np.ones(p.ring.capacity + SAMPLE_RATE, np.float32))  # the first second is gone
    assert p._audio_until(0).size == 0  # frame 0's audio was overwritten
    late = FPS * 2  # frame 60's audio is still held
    assert p._audio_until(late).size == round((late + 1) * SAMPLE_RATE / FPS) - p.ring.start


def test_finished_once_the_last_frame_of_the_file_is_due(pipeline) -> None:
    p = pipeline
    p.ring.write(np.zeros(SAMPLE_RATE + 100, np.float32))  # 30.19 frames: the last is 30
    origin = p.clock.origin()

    def at(frame: int) -> None:  # the middle of the tick when `frame` is due
        p.fake.t = origin + p.playout_delay + (frame + 0.5) * PERIOD

    at(40)
    assert not p.finished()  # the file is still playing
    p.source.finished = True
    at(29)
    assert not p.finished()
    at(30)
    assert p.finished()


def test_the_base_delay_covers_look_ahead_and_one_capture_block_with_the_margin() -> None:
    p = build_pipeline(_options())
    try:
        spare = []
        for k in range(300):
            # frame k is due at k/fps + delay; the capture may hold back its last block
            arrived = (k * PERIOD + p._base_delay()) * SAMPLE_RATE - BLOCK
            spare.append(arrived - p.engine.samples_needed(k))
        assert min(spare) == pytest.approx(MARGIN_S * SAMPLE_RATE)  # for the frame needing most
    finally:
        p.sink.close()


def _set_everything(p) -> dict:
    """Distinct values for all a snapshot reports; returns what it must say."""
    now, c = p.fake.t, p.counters
    names = ("frames_shown", "frames_new", "frames_held", "frames_repeated", "frames_generated",
             "frames_skipped", "frames_late", "frames_silent", "queue_drops",
             "late_ticks")  # fmt: skip
    for i, name in enumerate(names, start=1):
        setattr(c, name, 10 * i)
    for t in (now - 1.0, now - 0.5, now):
        c.shown_rate.tick(t)  # 2 intervals in 1 s
    for t in (now - 0.5, now - 0.25, now):
        c.generated_rate.tick(t)  # 2 in 0.5 s
    c.time_stage("generate", 0.004)
    stats = p.source.stats
    stats.overruns, stats.level_db, stats.problem = 3, -20.5, "the microphone is gone"
    stats.requested_latency_s, stats.granted_latency_s = 0.02, 0.03
    p.source.latency_s = 0.025
    p.source.measured_latency = lambda: (0.025, "timestamps")
    p.sink.latency_s, p.sink.problem = 0.04, "the camera is held by another program"
    p.look.engine.response_s = 0.007
    p.look.engine.status_line = lambda: "remote gpu: 12 ms"
    p.muted = True
    p.scheduler.mode = Mode("nearest", 2, 4)
    p.playout_delay, p.send_lag_s = 0.15, 0.003
    p._push([5], [_face(p, 0)], p.look)
    p._started_at = now - 12.5
    return dict(
        avatar="astronaut", engine="lite", tier="nearest", stride=2, batch=4, sink="memory",
        source=p.source.name, target_fps=FPS, shown_fps=2.0, generated_fps=4.0,
        **{name: getattr(c, name) for name in names}, queue_depth=1,
        queue_capacity=FACE_BUFFER, audio_overruns=3, level_db=-20.5,
        latency_ms=(0.025 + 0.15 + 0.003 + 0.04 + 0.007) * 1e3, playout_delay_ms=150.0,
        stages_ms={"generate": (4.0, 4.0)},
        warnings=(*p.warnings, "the microphone is gone: showing idle frames",
                  "the camera is held by another program",
                  "muted: the avatar stays idle (`livecam mute --off` to speak again)"),
        uptime_s=12.5, capture_ms=25.0, capture_basis="timestamps", capture_requested_ms=20.0,
        capture_granted_ms=30.0, remote="remote gpu: 12 ms",
    )  # fmt: skip


def test_the_snapshot_reports_every_counter_and_setting(pipeline) -> None:
    assert pipeline.snapshot().uptime_s == 0.0  # not started yet
    expected = _set_everything(pipeline)
    snap = pipeline.snapshot()
    assert set(expected) == {f.name for f in dataclasses.fields(Snapshot)}
    for name, value in expected.items():
        got = getattr(snap, name)
        if isinstance(value, float):
            assert got == pytest.approx(value), name
        else:
            assert got == value, name
    assert pipeline.latency_s() * 1e3 == pytest.approx(snap.latency_ms)


def test_a_failing_thread_stops_the_pipeline_and_keeps_its_error(pipeline, caplog) -> None:
    boom = RuntimeError("the engine failed")

    def fail() -> None:
        raise boom

    thread = threading.Thread(target=pipeline._guard(fail), name="generate")
    thread.start()
    thread.join()
    assert pipeline.error is boom and not pipeline.running
    record = caplog.records[-1]
    assert record.getMessage() == "pipeline thread generate failed"
    assert record.exc_info[1] is boom


def test_switch_frames_each_face_with_the_look_that_made_it(pipeline, caplog) -> None:
    caplog.set_level("INFO", logger=runner.__name__)
    p, old, frames = pipeline, pipeline.look, []
    p.on_frame = frames.append
    avatar = load_avatar("portrait")
    new = Look(
        avatar, old.engine.for_avatar(avatar), build_compositor(avatar, 160, 120, FPS, False)
    )
    before = _face(p, 9)
    p._push([0], [before], old)  # generated before the switch
    p.switch(new)
    assert (p.look, p.engine, p.compositor) == (new, new.engine, new.compositor)
    assert caplog.records[-1].getMessage() == "avatar switched to portrait"
    p._show(0, p.fake.t)
    assert np.array_equal(frames[0], old.compositor.compose(before, 0))


def test_start_runs_both_threads_and_stop_ends_them() -> None:
    """Real threads and time: the camera shows idle faces before the source delivers."""
    p = build_pipeline(_options())
    p.source.start = lambda: None  # a microphone still opening
    p.start()
    try:
        assert sorted(t.name for t in p._threads) == ["generate", "output"]
        assert all(t.daemon and t.is_alive() for t in p._threads)
        deadline = time.monotonic() + 20
        while not (p.counters.frames_silent and p.counters.frames_shown > 1):
            assert time.monotonic() < deadline and p.error is None, p.error
            time.sleep(0.01)
        assert p.snapshot().uptime_s > 0
    finally:
        p.stop()
    assert not any(t.is_alive() for t in p._threads) and p.sink.closed
    assert p.error is None
