"""The live pipeline: generation worker thread -> bounded frame buffer -> fixed-rate output.

Frame k shows the mouth for stream time [k/fps, (k+1)/fps) and goes on the camera when the
stream clock reaches k/fps + playout_delay. The output thread never waits for the worker: at
each tick it shows the newest frame that is due, or repeats the previous one (counted). The
worker never works on frames that can no longer be shown in time: it jumps forward instead.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.sources import BLOCK, SourceStats
from livecam.constants import SAMPLE_RATE
from livecam.engines.base import Engine
from livecam.pipeline.compositor import Compositor
from livecam.pipeline.stats import Counters, Snapshot
from livecam.sinks.base import Sink

log = logging.getLogger(__name__)

FRAME_BUFFER = 8  # generated frames waiting for their tick; oldest dropped beyond this
STALL_GRACE_S = 0.25  # audio this late means the source stalled: show idle frames
MARGIN_S = 0.01
GENERATION_BUDGET_S = 0.015  # assumed generation time before it has been measured


class AudioSource(Protocol):
    name: str
    latency_s: float
    finished: bool
    stats: SourceStats

    def start(self) -> None: ...
    def poll(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class PipelineConfig:
    fps: float
    avatar: str
    max_batch: int = 1


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        ring: AudioRing,
        clock: AudioClock,
        source: AudioSource,
        engine: Engine,
        compositor: Compositor,
        sink: Sink,
    ) -> None:
        self.cfg = config
        self.ring, self.clock, self.source = ring, clock, source
        self.engine, self.compositor, self.sink = engine, compositor, sink
        self.counters = Counters()
        self.warnings: list[str] = []
        self.playout_delay = self._derive_playout_delay()
        self._frames: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._frames_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_frame: np.ndarray | None = None
        self._audio_sent: int | None = None  # stream sample handed to the sink so far
        self._started_at = 0.0
        self.error: BaseException | None = None

    def _derive_playout_delay(self) -> float:
        """Look-ahead + one audio block + generation time + margin, in seconds after k/fps."""
        needed = self.engine.samples_needed(1000) / SAMPLE_RATE - 1000 / self.cfg.fps
        return needed + BLOCK / SAMPLE_RATE + GENERATION_BUDGET_S + MARGIN_S

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.monotonic()
        self.clock.seed(self._started_at)
        self.source.start()
        for target, name in ((self._work, "generate"), (self._output, "output")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced by wait()/stop() in the main thread
                log.exception("pipeline thread %s failed", threading.current_thread().name)
                self.error = exc
                self._stop.set()

        return run

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

    # -- timing ------------------------------------------------------------------------------
    def _due_frame(self, now: float) -> int:
        return math.floor((self.clock.stream_time(now) - self.playout_delay) * self.cfg.fps)

    # -- generation worker -------------------------------------------------------------------
    def _work(self) -> None:
        next_frame = 0
        while not self._stop.is_set():
            now = time.monotonic()
            due = self._due_frame(now)
            if next_frame <= due:  # too late to be shown: never work on stale frames
                self.counters.frames_skipped += due + 1 - next_frame
                next_frame = due + 1
            ready = self.ring.end
            if self.engine.samples_needed(next_frame) <= ready:
                batch = self._ready_batch(next_frame, ready)
                self._produce(batch, silent=False)
                next_frame = batch[-1] + 1
            elif self._source_stalled(now):  # idle frames, made just in time for their tick
                if next_frame <= due + 1:
                    self._produce(range(next_frame, next_frame + 1), silent=True)
                    next_frame += 1
                else:
                    self._stop.wait(0.5 / self.cfg.fps)
            else:
                wait = self.engine.samples_needed(next_frame) / SAMPLE_RATE
                wait -= self.clock.stream_time(now)
                self._stop.wait(min(max(wait, 0.002), 0.02))

    def _ready_batch(self, first: int, ready: int) -> range:
        last = first
        while (
            last + 1 < first + self.cfg.max_batch and self.engine.samples_needed(last + 1) <= ready
        ):
            last += 1
        return range(first, last + 1)

    def _source_stalled(self, now: float) -> bool:
        """The capture stream is this far behind the clock: the device stopped delivering."""
        return self.clock.stream_time(now) - self.ring.end / SAMPLE_RATE > STALL_GRACE_S

    def _produce(self, frames: range, silent: bool) -> None:
        t0 = time.perf_counter()
        faces = (
            self.engine.generate_silent(frames)
            if silent
            else self.engine.generate(self.ring, frames)
        )
        t1 = time.perf_counter()
        canvases = [self.compositor.compose(face, k) for k, face in zip(frames, faces, strict=True)]
        t2 = time.perf_counter()
        c = self.counters
        c.time_stage("generate", (t1 - t0) / len(frames))
        c.time_stage("compose", (t2 - t1) / len(frames))
        with self._frames_lock:
            for k, canvas in zip(frames, canvases, strict=True):
                if len(self._frames) >= FRAME_BUFFER:
                    self._frames.popleft()
                    c.queue_drops += 1
                self._frames.append((k, canvas))
        if silent:
            c.frames_silent += len(frames)
        else:
            c.frames_generated += len(frames)
        for _ in frames:
            c.generated_rate.tick()

    # -- output clock ------------------------------------------------------------------------
    def _take_due(self, due: int) -> tuple[int, np.ndarray] | None:
        """Newest frame with index <= due; older ones are discarded (they were superseded)."""
        found = None
        with self._frames_lock:
            while self._frames and self._frames[0][0] <= due:
                found = self._frames.popleft()
        return found

    def _output(self) -> None:
        period = 1.0 / self.cfg.fps
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._stop.wait(max(0.0, next_tick - time.monotonic()))
            if self._stop.is_set():
                break
            now = time.monotonic()
            due = self._due_frame(now)
            self._show(due, self._take_due(due), now)
            next_tick += period
            if now - next_tick > period:  # fell a whole frame behind: resync, never burst
                self.counters.late_ticks += 1
                next_tick = now + period

    def _show(self, due: int, item: tuple[int, np.ndarray] | None, now: float) -> None:
        c = self.counters
        if item is not None and item[0] == due:
            c.frames_new += 1
        else:
            c.frames_repeated += 1
        if item is not None:
            self._last_frame = item[1]
        if self._last_frame is None:
            self._last_frame = self.compositor.compose(
                self.engine.generate_silent(range(0, 1))[0], 0
            )
        t0 = time.perf_counter()
        self.sink.send(self._last_frame, self._audio_until(due))
        c.time_stage("sink", time.perf_counter() - t0)
        c.frames_shown += 1
        c.shown_rate.tick(now)

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
    def latency_s(self) -> float:
        """Estimated mic-to-camera latency: capture + playout delay + the sink's own."""
        return self.source.latency_s + self.playout_delay + self.sink.latency_s

    def snapshot(self) -> Snapshot:
        c = self.counters
        now = time.monotonic()
        warnings = list(self.warnings)
        if self.source.stats.problem:
            warnings.append(self.source.stats.problem + ": showing idle frames")
        return Snapshot(
            avatar=self.cfg.avatar,
            engine=self.engine.name,
            tier=self.engine.tier,
            sink=self.sink.name,
            source=self.source.name,
            target_fps=self.cfg.fps,
            shown_fps=c.shown_rate.rate(now),
            generated_fps=c.generated_rate.rate(now),
            frames_shown=c.frames_shown,
            frames_new=c.frames_new,
            frames_repeated=c.frames_repeated,
            frames_generated=c.frames_generated,
            frames_skipped=c.frames_skipped,
            frames_silent=c.frames_silent,
            queue_depth=len(self._frames),
            queue_capacity=FRAME_BUFFER,
            queue_drops=c.queue_drops,
            late_ticks=c.late_ticks,
            audio_overruns=self.source.stats.overruns,
            level_db=self.source.stats.level_db,
            latency_ms=self.latency_s() * 1e3,
            playout_delay_ms=self.playout_delay * 1e3,
            stages_ms=c.stage_percentiles(),
            warnings=tuple(warnings),
            uptime_s=now - self._started_at if self._started_at else 0.0,
        )
