"""Assembles engines and compositors for an avatar; shared by start, render and bench."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar
from livecam.constants import SAMPLE_RATE
from livecam.engines.base import Engine
from livecam.pipeline.compositor import Compositor, webcam_framing
from livecam.sinks.base import Sink

if TYPE_CHECKING:
    from livecam.engines.musetalk.engine import MuseTalkOptions


class EngineError(Exception):
    """An engine that cannot run here, with a message fit for the user."""


@dataclass(frozen=True)
class EngineRequest:
    avatar: Avatar
    fps: float
    idle_motion: bool = True
    musetalk: MuseTalkOptions | None = None  # a full set (tests, benchmarks), else built from:
    models_dir: Path | None = None
    device: str | None = None
    streaming: bool = True  # live features, or the whole clip at once (render)


def _lite(request: EngineRequest) -> Engine:
    from livecam.engines.lite import LiteEngine

    return LiteEngine(request.avatar, request.fps, idle_motion=request.idle_motion)


def _musetalk(request: EngineRequest) -> Engine:
    from livecam.engines.musetalk import ExtraMissing, require_extra

    try:
        require_extra()
    except ExtraMissing as exc:
        raise EngineError(str(exc)) from None
    from livecam.engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions
    from livecam.engines.musetalk.manifest import default_models_dir
    from livecam.engines.musetalk.models import load_models, random_models
    from livecam.engines.musetalk.weights import WeightsError

    features = "streaming" if request.streaming else "offline"
    opts = request.musetalk or MuseTalkOptions(
        request.models_dir, request.device, features=features
    )
    try:
        if opts.random_weights:
            models = random_models(opts.device)
        else:
            models = load_models(opts.models_dir or default_models_dir(), opts.device)
        return MuseTalkEngine(request.avatar, request.fps, models, opts, request.idle_motion)
    except (WeightsError, ValueError) as exc:
        raise EngineError(str(exc)) from None


BUILDERS: dict[str, Callable[[EngineRequest], Engine]] = {"lite": _lite, "musetalk": _musetalk}
ENGINES = tuple(BUILDERS)


def build_engine(
    name: str,
    avatar: Avatar,
    fps: float,
    idle_motion: bool = True,
    options: MuseTalkOptions | None = None,
    *,
    models_dir: Path | None = None,
    device: str | None = None,
    streaming: bool = True,
) -> Engine:
    builder = BUILDERS.get(name)
    if builder is None:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    return builder(EngineRequest(avatar, fps, idle_motion, options, models_dir, device, streaming))


def remote_token(token_file: Path | None) -> str:
    """The pool's token from --token-file; EngineError where there is none to read."""
    from livecam.remote.tokens import TokenError, read_token

    if token_file is None:
        raise EngineError("--remote needs --token-file FILE (the server's token)")
    try:
        return read_token(token_file)
    except TokenError as exc:
        raise EngineError(str(exc)) from None


def build_remote(
    url: str,
    token: str,
    avatar: Avatar,
    fps: float,
    idle_motion: bool = True,
    *,
    remote_only: bool = False,
    reply_timeout_s: float | None = None,
    connections: int | None = None,
) -> Engine:
    """The remote engine on `livecam serve` at `url` (local lite frames while unreachable,
    unless remote_only; and for replies later than `reply_timeout_s`, default live: 1 s),
    each call on `connections` connections (None: two over a network, one on loopback).
    Raises EngineError for a bad address or a refusal (the token, say)."""
    from livecam.engines.lite import LiteEngine
    from livecam.remote.client import REPLY_TIMEOUT_S, RemoteError, open_remote

    try:
        fallback = LiteEngine(avatar, fps, idle_motion=idle_motion)
        timeout = reply_timeout_s or REPLY_TIMEOUT_S
        return open_remote(url, token, avatar, fallback, remote_only=remote_only,
                           reply_timeout_s=timeout, connections=connections)  # fmt: skip
    except (RemoteError, ValueError) as exc:
        raise EngineError(str(exc)) from None


def build_compositor(
    avatar: Avatar, width: int, height: int, fps: float, idle_motion: bool = True
) -> Compositor:
    framing = webcam_framing(avatar.landmarks, avatar.image.shape, width / height)
    if avatar.motion is None:
        (x0, y0), (x1, y1) = avatar.landmarks.min(axis=0), avatar.landmarks.max(axis=0)
        head = (float(x0), float(y0), float(x1), float(y1))
        return Compositor(avatar.image, framing, width, height, fps, idle_motion, head_box=head)
    motion = avatar.motion

    def head_motion(frame: int) -> np.ndarray:
        return motion[avatar.clip_index(frame / fps)]

    h, w = avatar.image.shape[:2]
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float32)
    moved = np.einsum("nij,kj->nki", motion, corners)  # where each corner goes, per frame
    shift = float(np.abs(moved - corners[:, :2]).max())  # the image's largest travel
    return Compositor(avatar.image, framing, width, height, fps, idle_motion, head_motion, shift)


@dataclass(frozen=True)
class RenderResult:
    frames: int
    seconds: float  # wall time spent
    audio_seconds: float
    frame_ms: list[float]  # engine + compositing time per frame


def render_audio(
    audio: np.ndarray, engine: Engine, compositor: Compositor, sink: Sink, batch: int = 8
) -> RenderResult:
    """Offline: every frame of the audio through engine and compositor into the sink.

    A worker thread generates and composes while this one hands frames to the sink (colour
    conversion, the encoder's pipe): the two overlap on two cores, through a bounded queue
    that keeps the frames in order. Canvases the sink has taken are drawn into again (no new
    2.7 MB frame, only the moving head redrawn).
    """
    fps = compositor.fps
    n_frames = math.ceil(len(audio) / SAMPLE_RATE * fps)
    pad = max(0, engine.samples_needed(n_frames - 1) - len(audio))
    ring = AudioRing(len(audio) + pad)
    ring.write(audio)
    ring.write(np.zeros(pad, dtype=np.float32))
    frame_ms: list[float] = []
    frames: queue.Queue[tuple[int, np.ndarray] | BaseException | None] = queue.Queue(2 * batch)
    spare: queue.Queue[np.ndarray] = queue.Queue(2 * batch + 2)
    stop = threading.Event()

    def offer(item: tuple[int, np.ndarray] | BaseException | None) -> bool:
        """Queue an item unless the consumer has stopped (then never block)."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                frames.put(item, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for first in range(0, n_frames, batch):
                ks = range(first, min(n_frames, first + batch))
                t0 = time.perf_counter()
                faces = engine.generate(ring, ks)
                per_face = (time.perf_counter() - t0) / len(ks)
                for k, face in zip(ks, faces, strict=True):
                    t1 = time.perf_counter()
                    canvas = compositor.compose(face, k, _take(spare))
                    frame_ms.append((per_face + time.perf_counter() - t1) * 1e3)
                    if not offer((k, canvas)):
                        return
            offer(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)

    start = time.perf_counter()
    worker = threading.Thread(target=produce, name="render-generate", daemon=True)
    worker.start()
    try:
        while (item := frames.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            k, canvas = item
            a, b = round(k * SAMPLE_RATE / fps), round((k + 1) * SAMPLE_RATE / fps)
            sink.send(canvas, audio[a:b])
            with contextlib.suppress(queue.Full):
                spare.put_nowait(canvas)
    except BaseException:
        stop.set()
        worker.join()
        with contextlib.suppress(Exception):  # keeps what was rendered; the first error counts
            sink.close()
        raise
    stop.set()
    worker.join()
    sink.close()
    return RenderResult(n_frames, time.perf_counter() - start, len(audio) / SAMPLE_RATE, frame_ms)


def _take(spare: queue.Queue[np.ndarray]) -> np.ndarray | None:
    """A canvas the sink is done with (sinks copy what they keep), if there is one."""
    try:
        return spare.get_nowait()
    except queue.Empty:
        return None
