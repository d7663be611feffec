"""`livecam start`: wires source, engine, compositor and sink into a running pipeline."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from livecam import dashboard
from livecam.audio.clock import AudioClock
from livecam.audio.device_watch import DeviceWatch
from livecam.audio.ring import AudioRing
from livecam.audio.sources import FileSource, MicSource
from livecam.audio.virtual_mic import DESCRIPTION, VirtualMic
from livecam.avatar.store import AvatarError, load_avatar
from livecam.constants import SAMPLE_RATE
from livecam.control import ControlError, ControlServer, snapshot_dict
from livecam.engines.simulated import SimulatedLoad
from livecam.pipeline.runner import Look, Pipeline, PipelineConfig
from livecam.pipeline.stats import Snapshot
from livecam.service.heartbeat import Heartbeat, status_line
from livecam.service.notify import Notifier
from livecam.session import build_compositor, build_engine, build_remote, remote_token
from livecam.sinks import SinkSettings, open_sink

log = logging.getLogger(__name__)

RING_SECONDS = 30  # audio history kept: far more than any playout delay
STATUS_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class LiveOptions:
    avatar: str
    engine: str = "lite"
    sink: str = "auto"
    mic: str | None = None
    audio_file: Path | None = None
    loop: bool = False
    camera: str | None = None
    camera_backend: str | None = None
    width: int = 1280
    height: int = 720
    fps: float = 30
    port: int = 8080
    out: Path | None = None
    idle_motion: bool = True
    dashboard: bool = True
    duration: float | None = None  # stop after this many seconds
    simulate_load: float | None = None  # make generation take this many frame budgets
    virtual_mic: bool = False  # publish the delayed "LiveCam Microphone"
    models_dir: Path | None = None  # musetalk weights
    torch_device: str | None = None  # musetalk: cuda | cpu (default: auto)
    remote: str | None = None  # ws://HOST:PORT of `livecam serve`: generate there
    token_file: Path | None = None  # its token
    remote_only: bool = False  # exit instead of local lite frames if it is unreachable
    remote_connections: int | None = None  # 1 or 2 per call; None: 2 over a network, else 1


def build_pipeline(opts: LiveOptions) -> Pipeline:
    """Everything is loaded and opened here, before any frame flows: errors surface early,
    the cheap ones (avatar, token file, audio input) before an engine loads weights or
    reaches a pool."""
    avatar = load_avatar(opts.avatar)
    token = remote_token(opts.token_file) if opts.remote else ""
    ring, clock = AudioRing(RING_SECONDS * SAMPLE_RATE), AudioClock()
    if opts.audio_file is not None:
        source = FileSource(ring, clock, opts.audio_file, loop=opts.loop)
    else:
        source = MicSource(ring, clock, opts.mic, avoid_own_output=opts.virtual_mic)
    if opts.remote:
        engine = build_remote(opts.remote, token, avatar, opts.fps, opts.idle_motion,
                              remote_only=opts.remote_only,
                              connections=opts.remote_connections)  # fmt: skip
    else:
        engine = build_engine(
            opts.engine,
            avatar,
            opts.fps,
            opts.idle_motion,
            models_dir=opts.models_dir,
            device=opts.torch_device,
        )
    if opts.simulate_load:
        engine = SimulatedLoad(engine, opts.simulate_load, opts.fps)
    compositor = build_compositor(avatar, opts.width, opts.height, opts.fps, opts.idle_motion)
    sink, warnings = open_sink(
        opts.sink,
        SinkSettings(
            width=opts.width,
            height=opts.height,
            fps=opts.fps,
            device=opts.camera,
            backend=opts.camera_backend,
            port=opts.port,
            out=opts.out,
        ),
    )
    for warning in warnings:
        log.warning("%s", warning)
    pipeline = Pipeline(
        PipelineConfig(fps=opts.fps), ring, clock, source, Look(avatar, engine, compositor), sink
    )
    pipeline.warnings.extend(warnings)
    return pipeline


def run(opts: LiveOptions, console: Console) -> int:
    """Runs until Ctrl-C, SIGTERM, `livecam stop`, --duration, or the end of an --audio file."""
    control = ControlServer({})
    control.start()  # first: refuses to run twice, before the camera is touched
    try:
        return _run(opts, console, control)
    finally:
        control.stop()


def _run(opts: LiveOptions, console: Console, control: ControlServer) -> int:
    pipeline = build_pipeline(opts)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    deadline = time.monotonic() + opts.duration if opts.duration else None
    virtual_mic = VirtualMic(pipeline.ring, pipeline.clock, pipeline.audio_delay_s)
    control.handlers.update(_control_handlers(pipeline, virtual_mic, stop, opts))
    watch = DeviceWatch([pipeline.source.poll, virtual_mic.poll])
    try:
        pipeline.start()
        if opts.virtual_mic:
            virtual_mic.start()
            pipeline.side_problems.append(lambda: virtual_mic.problem)
            log.info("virtual microphone %r is ready: select it in the meeting app", DESCRIPTION)
        watch.start()
        log.info(
            "running: camera %s, microphone %s, latency ~%.0f ms",
            pipeline.sink.name,
            pipeline.source.name,
            pipeline.latency_s() * 1e3,
        )
        _loop(pipeline, stop, deadline, console if opts.dashboard else None)
    finally:
        watch.stop()  # first: no device is reopened behind the stops below
        virtual_mic.stop()
        pipeline.stop()
        close_engine(pipeline.engine)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    snap = pipeline.snapshot()
    log.info(
        "stopped: %d frames shown (%.1f%% repeated), %d generated, %d skipped late",
        snap.frames_shown,
        100 * snap.repeat_ratio,
        snap.frames_generated,
        snap.frames_skipped,
    )
    if pipeline.error is not None:
        raise pipeline.error
    return 0


def close_engine(engine: object) -> None:
    """Close what an engine holds open beyond the pipeline (the remote engine's connection)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _control_handlers(
    pipeline: Pipeline, mic: VirtualMic, stop: threading.Event, opts: LiveOptions
) -> dict:
    def status(_: dict) -> dict:
        return snapshot_dict(pipeline.snapshot())

    def stop_now(_: dict) -> dict:
        stop.set()
        return {"stopping": True}

    def mute(message: dict) -> dict:
        on = message.get("on", True)
        if not isinstance(on, bool):  # "false" is a truthy string: never guess
            raise ControlError(f'"on" must be true or false, not {on!r}')
        pipeline.muted = mic.muted = on
        log.info("%s", "muted" if pipeline.muted else "unmuted")
        return {"muted": pipeline.muted}

    switching = threading.Lock()  # one switch (maybe an avatar rebuild) at a time

    def avatar(message: dict) -> dict:
        name = message.get("name")
        if not isinstance(name, str):
            raise ControlError('"name" must be an avatar name')
        # Runs on this request's own thread: status and stop stay answered meanwhile. A second
        # switch is refused rather than queued, so waiting switches never fill the slots.
        if not switching.acquire(blocking=False):
            raise ControlError("another avatar switch is in progress; retry when it is done")
        try:
            pipeline.switch(build_look(pipeline, name, opts))
        except (AvatarError, ValueError) as exc:
            raise ControlError(str(exc)) from None
        finally:
            switching.release()
        return {"avatar": name}

    return {"status": status, "stop": stop_now, "mute": mute, "avatar": avatar}


def build_look(pipeline: Pipeline, name: str, opts: LiveOptions) -> Look:
    """Another avatar for the running pipeline: its cache (prepared if bundled), the same
    engine on it, and its framing at the camera's size."""
    avatar = load_avatar(name)
    engine = pipeline.engine.for_avatar(avatar)
    compositor = build_compositor(avatar, opts.width, opts.height, opts.fps, opts.idle_motion)
    return Look(avatar, engine, compositor)


def _loop(
    pipeline: Pipeline,
    stop: threading.Event,
    deadline: float | None,
    console: Console | None,
) -> None:
    def done() -> bool:
        expired = deadline is not None and time.monotonic() >= deadline
        return stop.is_set() or not pipeline.running or expired or pipeline.finished()

    notifier = Notifier()  # systemd's Type=notify; silent elsewhere
    heartbeat = Heartbeat(notifier)

    def tick() -> Snapshot:
        snap = pipeline.snapshot()
        heartbeat.beat(snap, time.monotonic())
        return snap

    try:
        if console is None:  # headless (systemd): a status line in the log now and then
            next_log = time.monotonic() + STATUS_LOG_EVERY_S
            while not stop.wait(0.25) and not done():
                snap = tick()
                if time.monotonic() >= next_log:
                    next_log += STATUS_LOG_EVERY_S
                    log.info("status: %s", status_line(snap))
            return
        with (
            Live(
                dashboard.render(pipeline.snapshot()),
                console=console,
                refresh_per_second=4,
                transient=False,
            ) as live,
            _logging_to(console),
        ):
            while not stop.wait(0.25) and not done():
                live.update(dashboard.render(tick()))
    finally:
        notifier.stopping()
        notifier.close()


@contextlib.contextmanager
def _logging_to(console: Console) -> Iterator[None]:
    """Log through the dashboard's console, so log lines print above it, not into it."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, RichHandler)]
    previous = [h.console for h in handlers]
    for handler in handlers:
        handler.console = console
    try:
        yield
    finally:
        for handler, old in zip(handlers, previous, strict=True):
            handler.console = old
