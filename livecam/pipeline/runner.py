"""The live pipeline: generation worker thread -> bounded face buffer -> fixed-rate output.

Frame k shows the mouth for stream time [k/fps, (k+1)/fps) and goes on the camera when the
stream clock reaches k/fps + playout_delay. The output thread never waits for the worker: at
each tick it composes the newest face that is due (head motion stays smooth even when the
mouth is generated only every n-th frame) or repeats the previous one (counted). The worker
never works on frames that can no longer be shown in time: it jumps forward instead, and the
scheduler picks tier, stride and batch so that it keeps up. An engine whose calls take a round
trip (remote) has several in flight: each goes out as soon as its audio is in.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.sources import AudioSource
from livecam.avatar.model import Avatar
from livecam.constants import BLOCK, SAMPLE_RATE
from livecam.engines.base import Call, Engine, PipelinedEngine
from livecam.pipeline.compositor import Compositor
from livecam.pipeline.scheduler import Mode, Scheduler
from livecam.pipeline.stats import Counters, Snapshot
from livecam.sinks.base import Sink

log = logging.getLogger(__name__)

FACE_BUFFER = 16  # generated faces waiting for their tick; oldest dropped beyond this
TICK_LAG = 0.002  # s a tick falls after its frame is due (timer wake-up jitter)
MIN_INTERVAL = 0.9  # periods: shorter only to follow the audio clock's small corrections
STALL_GRACE_S = 0.25  # the capture stream this far behind the clock: the source stalled
MARGIN_S = 0.005  # scheduling jitter of the worker thread
SEND_LAGS = 90  # frames in the median of how late frames reach the sink (3 s at 30 fps)
MAX_IN_FLIGHT = 32  # calls of a pipelined engine at once: a second of them (the reply timeout)


@dataclass(frozen=True)
class PipelineConfig:
    fps: float


@dataclass(frozen=True)
class Look:
    """What the camera shows: an avatar, the engine that animates it and its framing. Each
    generated face carries the look that made it, so an avatar switch never frames one
    avatar's face with another's compositor."""

    avatar: Avatar
    engine: Engine
    compositor: Compositor


Face = tuple[int, np.ndarray, Look]  # (frame index, avatar-size face, its look)


@dataclass(frozen=True)
class InFlight:
    """A pipelined engine's call, sent and not yet answered."""

    frames: range
    mode: Mode
    look: Look
    call: Call
    sent: float  # perf_counter()
    scheduler: Scheduler  # the one that planned it


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        ring: AudioRing,
        clock: AudioClock,
        source: AudioSource,
        look: Look,
        sink: Sink,
    ) -> None:
        self.cfg = config
        self.ring, self.clock, self.source = ring, clock, source
        self.look = look  # replaced whole by switch()
        self.sink = sink
        self.counters = Counters()
        self.warnings: list[str] = []
        # why a side output (the virtual microphone) is not working now; "" when it is
        self.side_problems: list[Callable[[], str]] = []
        self._plan()
        self._faces: collections.deque[Face] = collections.deque()
        self._faces_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._shown: Face | None = None
        self._audio_sent: int | None = None  # stream sample handed to the sink so far
        # how long after its due time a frame reaches the sink (timer wake-up, compositing):
        # measured, as it depends on the machine and its load; TICK_LAG until measured
        self._send_lags: collections.deque[float] = collections.deque(maxlen=SEND_LAGS)
        self.send_lag_s = TICK_LAG
        self._started_at = 0.0
        self.on_tick: Callable[[int, float], None] | None = None  # (due frame, now) hook
        self.on_frame: Callable[[np.ndarray], None] | None = None  # each frame as it goes out
        self.muted = False  # idle faces whatever the microphone hears
        self.error: BaseException | None = None

    @property
    def engine(self) -> Engine:
        return self.look.engine

    @property
    def compositor(self) -> Compositor:
        return self.look.compositor

    def switch(self, look: Look) -> None:
        """Show another avatar from the next generated face on (the camera never stops).
        The new engine must be `engine.for_avatar(...)` of the current one: same tiers,
        batch sizes and look-ahead, so the scheduler and the playout delay still hold."""
        self.look = look
        log.info("avatar switched to %s", look.avatar.name)

    def _plan(self) -> None:
        """A scheduler, and its playout delay, for the engine's tiers, batch sizes and
        look-ahead."""
        engine = self.engine
        self.scheduler = Scheduler(self.cfg.fps, engine.tiers, engine.batch_sizes,
                                   self._base_delay())  # fmt: skip
        self.playout_delay = self.scheduler.playout_delay

    def _base_delay(self) -> float:
        """Frame length + engine look-ahead + one capture block + margin, after k/fps."""
        lookahead = self.engine.samples_needed(1000) / SAMPLE_RATE - 1000 / self.cfg.fps
        return lookahead + BLOCK / SAMPLE_RATE + MARGIN_S

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.monotonic()
        self.clock.seed(self._started_at)
        self.source.start()
        for target, name in ((self._work, "generate"), (self._output, "output")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced through .error to the main thread
                log.exception("pipeline thread %s failed", threading.current_thread().name)
                self.error = exc
                self._stop.set()

        return run

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.source.stop()
        self.sink.close()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def finished(self) -> bool:
        """True once a file source has played out and its last frame was shown."""
        if not self.source.finished:
            return False
        last_frame = math.ceil(self.ring.end / SAMPLE_RATE * self.cfg.fps) - 1
        return self._due_frame(time.monotonic()) >= last_frame

    def _due_frame(self, now: float) -> int:
        return math.floor((self.clock.stream_time(now) - self.playout_delay) * self.cfg.fps)

    # -- generation worker -------------------------------------------------------------------
    def _work(self) -> None:
        next_frame = 0
        in_flight: collections.deque[InFlight] = collections.deque()
        while not self._stop.is_set():
            self._follow_engine()
            now = time.monotonic()
            mode, look = self.scheduler.mode, self.look
            due = self._due_frame(now)
            if next_frame <= due:  # never work on frames too late to be shown
                self.counters.frames_skipped += due + 1 - next_frame
                next_frame = due + 1
            first = -(-next_frame // mode.stride) * mode.stride  # strided frames are aligned
            batch = range(first, first + mode.batch * mode.stride, mode.stride)
            engine = look.engine
            needed = engine.samples_needed(batch[-1])
            ready = not self.muted and needed <= self.ring.end
            if ready and self._room_for_a_call(engine, mode, in_flight):
                if engine.tier != mode.tier:
                    engine.set_tier(mode.tier)
                in_flight.append(InFlight(batch, mode, look, engine.submit(self.ring, batch),
                                          time.perf_counter(), self.scheduler))  # fmt: skip
                next_frame = batch[-1] + 1
            elif in_flight:  # the oldest reply, or the next batch's audio, whichever is first
                wait = 0.02 if ready else needed / SAMPLE_RATE - self.clock.stream_time(now)
                self._collect(in_flight, min(max(wait, 0.002), 0.02))
            elif ready:
                self._generate(batch, mode, look)
                next_frame = batch[-1] + 1
            elif self.muted or self._source_stalled(now):  # idle faces, just in time
                if first <= due + mode.stride:
                    self._push(range(first, first + 1), look.engine.generate_silent([first]), look)
                    self.counters.frames_silent += 1
                    next_frame = first + 1
                else:
                    self._stop.wait(0.5 / self.cfg.fps)
            else:
                wait = needed / SAMPLE_RATE - self.clock.stream_time(now)
                self._stop.wait(min(max(wait, 0.002), 0.02))

    def _follow_engine(self) -> None:
        """A remote engine that reached a server running another engine than it planned with
        (the local one's, while the server was unreachable at the start): the scheduler and
        the playout delay start afresh from its tiers, batch sizes and look-ahead."""
        engine = self.look.engine
        if not (isinstance(engine, PipelinedEngine) and engine.follow_server()):
            return
        self._plan()
        log.info("generating with %s: tiers %s, playout delay %.0f ms from now", engine.name,
                 ", ".join(engine.tiers), self.playout_delay * 1e3)  # fmt: skip

    def _room_for_a_call(
        self, engine: Engine, mode: Mode, in_flight: collections.deque[InFlight]
    ) -> bool:
        """A pipelined engine that sent no more calls in the last round trip than its pace
        asks for: one a period as their audio comes in (as many as the round trip holds
        periods), and one more to catch up after a late one. Calls out for longer and still
        unanswered (a lost packet holds them up) do not count: the next ones still go out
        on time, not in a burst once the held-up ones are answered. Before the first reply,
        one call at a time: it tells the scheduler what a call costs, where a call a period
        to a slower generator would queue there for the whole stream's start."""
        if not isinstance(engine, PipelinedEngine) or len(in_flight) >= MAX_IN_FLIGHT:
            return False
        round_trip = engine.round_trip_s()
        if round_trip is None:
            return not in_flight
        period = mode.batch * mode.stride / self.cfg.fps
        calls = max(1, math.ceil(round_trip / period))
        since = time.perf_counter() - calls * period
        return sum(1 for call in in_flight if call.sent > since) <= calls

    def _generate(self, frames: range, mode: Mode, look: Look) -> None:
        engine = look.engine
        if engine.tier != mode.tier:
            engine.set_tier(mode.tier)
        t0 = time.perf_counter()
        faces = engine.generate(self.ring, frames)
        self._made(frames, faces, mode, look, time.perf_counter() - t0)

    def _collect(self, in_flight: collections.deque[InFlight], timeout: float) -> None:
        """The oldest call's faces, if they come within `timeout`."""
        call = in_flight[0]
        faces = call.call.wait(timeout)
        if faces is not None:
            in_flight.popleft()
            latency = time.perf_counter() - call.sent
            planned = call.mode if call.scheduler is self.scheduler else None  # not a replan's
            self._made(call.frames, faces, planned, call.look, call.call.busy_s, latency)

    def _made(self, frames: range, faces: list[np.ndarray], mode: Mode | None, look: Look,
              seconds: float, latency: float | None = None) -> None:  # fmt: skip
        """Generated faces into the buffer; the call's cost (and latency) to the scheduler,
        unless planned before the engine changed (`mode` None). Faces whose frame is due
        already are counted late (a remote reply that a lost packet held up): the camera
        showed the mouth before them."""
        self.counters.time_stage("generate", seconds / len(frames))
        due = self._due_frame(time.monotonic())
        self.counters.frames_late += sum(1 for k in frames if k <= due)
        self._push(frames, faces, look)
        self.counters.frames_generated += len(frames)
        for _ in frames:
            self.counters.generated_rate.tick()
        if mode is not None and self.scheduler.observe(mode, seconds, latency=latency):
            new = self.scheduler.mode
            self.playout_delay = self.scheduler.playout_delay
            log.info(
                "scheduler: tier %s, every %d. frame, batch %d, playout delay %.0f ms",
                new.tier,
                new.stride,
                new.batch,
                self.playout_delay * 1e3,
            )

    def _source_stalled(self, now: float) -> bool:
        """The capture stream is this far behind the clock: the device stopped delivering."""
        return self.clock.stream_time(now) - self.ring.end / SAMPLE_RATE > STALL_GRACE_S

    def _push(self, frames: range | list[int], faces: list[np.ndarray], look: Look) -> None:
        with self._faces_lock:
            for k, face in zip(frames, faces, strict=True):
                if len(self._faces) >= FACE_BUFFER:
                    self._faces.popleft()
                    self.counters.queue_drops += 1
                self._faces.append((k, face, look))

    # -- output clock ------------------------------------------------------------------------
    def _take_due(self, due: int) -> Face | None:
        """Newest face with index <= due; older ones are discarded (they were superseded)."""
        found = None
        with self._faces_lock:
            while self._faces and self._faces[0][0] <= due:
                found = self._faces.popleft()
        return found

    def _output(self) -> None:
        period = 1.0 / self.cfg.fps
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._stop.wait(max(0.0, next_tick - time.monotonic()))
            if self._stop.is_set():
                break
            now = time.monotonic()
            if now - next_tick > period:  # fell a whole frame behind (counted, never a burst)
                self.counters.late_ticks += 1
            due = self._due_frame(now)
            next_tick = self._next_tick(due, now)
            self._show(due, now)

    def _next_tick(self, due: int, now: float) -> float:
        """When frame due+1 falls due (within a period of now), plus TICK_LAG; if that is
        sooner than MIN_INTERVAL periods, the due time after it. The ticks stay locked to the
        frames' due times, so a frame goes out as soon as it may (a free-running grid added up
        to a period, by the chance of its start), and the camera never runs faster than its
        rate: after a new playout delay or a stall, one longer interval locks them again."""
        period = 1.0 / self.cfg.fps
        stream_due = (due + 1) * period + self.playout_delay
        ahead = stream_due - self.clock.stream_time(now) + TICK_LAG
        if ahead < MIN_INTERVAL * period:
            ahead += period
        # bounded too where the clock re-anchored between reading `due` and now
        return now + min(max(ahead, MIN_INTERVAL * period), 2 * period)

    def _show(self, due: int, now: float) -> None:
        c = self.counters
        item = self._take_due(due)
        if item is not None:
            self._shown = item
        if self._shown is None:  # nothing generated yet: the idle face
            look = self.look
            self._shown = (due, look.engine.generate_silent([max(due, 0)])[0], look)
        index, face, look = self._shown
        if index == due:
            kind = "new"
        elif due - index < self.scheduler.mode.stride and item is None:
            kind = "held"  # between strided frames: the mouth holds, the head moves
        else:
            kind = "repeated"
        t0 = time.perf_counter()
        frame = look.compositor.compose(face, due)
        t1 = time.perf_counter()
        if self.on_frame is not None:
            self.on_frame(frame)
        self._note_send_lag(due)
        self.sink.send(frame, self._audio_until(due))
        c.time_stage("compose", t1 - t0)
        c.time_stage("sink", time.perf_counter() - t1)
        c.time_stage("latency", self.clock.stream_time(now) - index / self.cfg.fps)
        c.count_shown(kind)
        c.shown_rate.tick(now)
        if self.on_tick is not None:
            self.on_tick(index, now)

    def _note_send_lag(self, due: int) -> None:
        due_at = due / self.cfg.fps + self.playout_delay
        self._send_lags.append(self.clock.stream_time(time.monotonic()) - due_at)
        self.send_lag_s = max(0.0, statistics.median(self._send_lags))

    def _audio_until(self, due: int) -> np.ndarray:
        """The captured audio up to the end of the due frame, for sinks that record it."""
        if self._audio_sent is None:  # the recording starts with the first frame shown
            self._audio_sent = round(due * SAMPLE_RATE / self.cfg.fps)
        end = min(round((due + 1) * SAMPLE_RATE / self.cfg.fps), self.ring.end)
        start = self._audio_sent if self._audio_sent < 0 else max(self._audio_sent, self.ring.start)
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        self._audio_sent = end
        return self.ring.read(start, end)

    # -- status ------------------------------------------------------------------------------
    def audio_delay_s(self) -> float:
        """How far to delay the microphone so that it sounds in step with the camera."""
        return self.playout_delay + self.send_lag_s + self.sink.latency_s + self.engine.response_s

    def latency_s(self) -> float:
        """Estimated mic-to-camera latency: capture (measured) + the delay in step with it."""
        return self.source.latency_s + self.audio_delay_s()

    def snapshot(self) -> Snapshot:
        c = self.counters
        now = time.monotonic()
        warnings = [*self.warnings, *self.engine.warnings]  # the engine's may change (remote)
        if self.source.stats.problem:
            warnings.append(self.source.stats.problem + ": showing idle frames")
        if getattr(self.sink, "problem", None):  # e.g. the camera is held by another program
            warnings.append(self.sink.problem)
        warnings += [problem for side in self.side_problems if (problem := side())]
        if self.muted:
            warnings.append("muted: the avatar stays idle (`livecam mute --off` to speak again)")
        mode = self.scheduler.mode
        capture_s, capture_basis = self.source.measured_latency()
        stats = self.source.stats
        shown, new, held, repeated = c.shown_counts()
        return Snapshot(
            avatar=self.look.avatar.name,
            engine=self.engine.name,
            tier=mode.tier,
            stride=mode.stride,
            batch=mode.batch,
            sink=self.sink.name,
            source=self.source.name,
            target_fps=self.cfg.fps,
            shown_fps=c.shown_rate.rate(now),
            generated_fps=c.generated_rate.rate(now),
            frames_shown=shown,
            frames_new=new,
            frames_held=held,
            frames_repeated=repeated,
            frames_generated=c.frames_generated,
            frames_skipped=c.frames_skipped,
            frames_late=c.frames_late,
            frames_silent=c.frames_silent,
            queue_depth=len(self._faces),
            queue_capacity=FACE_BUFFER,
            queue_drops=c.queue_drops,
            late_ticks=c.late_ticks,
            audio_overruns=self.source.stats.overruns,
            level_db=self.source.stats.level_db,
            latency_ms=(capture_s + self.audio_delay_s()) * 1e3,
            playout_delay_ms=self.playout_delay * 1e3,
            stages_ms=c.stage_percentiles(),
            warnings=tuple(warnings),
            uptime_s=now - self._started_at if self._started_at else 0.0,
            capture_ms=capture_s * 1e3,
            capture_basis=capture_basis,
            capture_requested_ms=stats.requested_latency_s * 1e3,
            capture_granted_ms=stats.granted_latency_s * 1e3,
            remote=getattr(self.engine, "status_line", str)(),
        )
