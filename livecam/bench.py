"""`livecam bench`: engine, compositing and render speed, as a JSON-ready dict."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from livecam.audio.files import read_audio
from livecam.avatar.store import load_avatar
from livecam.constants import SAMPLE_RATE
from livecam.session import build_compositor, build_engine, render_audio
from livecam.sinks import SinkSettings, open_sink
from livecam.sinks.memory import MemorySink

SAMPLE_AUDIO = Path(__file__).parent / "samples" / "jfk.wav"
WARM_UP_S = 1.0  # audio rendered untimed before the per-frame figures


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(values_ms, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def camera_sink_cost(
    frame: np.ndarray, fps: float, frames: int = 60, backend: str | None = None
) -> dict:
    """What one frame costs at the virtual camera (colour conversion + write), if one opens.

    livecam hands pyvirtualcam BGR and it writes I420 (YU12), which ffmpeg, GStreamer and
    browsers read. Measured in an emulated guest at 1280x720 (ms per frame, conversion +
    write): BGR in, I420 on the wire 28.6; I420 converted by OpenCV first 35.8; NV12 37.2;
    YUYV 114; UYVY 261. So BGR in is also the cheapest."""
    from livecam.sinks.base import SinkError
    from livecam.sinks.virtualcam import VirtualCamSink

    height, width = frame.shape[:2]
    try:
        sink = VirtualCamSink(width, height, fps, backend=backend)
    except SinkError as exc:
        return {"unavailable": str(exc)}
    audio = np.zeros(0, np.float32)
    times = []
    try:
        for _ in range(frames):
            t0 = time.perf_counter()
            sink.send(frame, audio)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"device": sink.device, "input": "BGR", "wire_format": sink.wire_format,
                "ms_per_frame": _percentiles(times)}  # fmt: skip
    finally:
        sink.close()


def run_bench(
    engine_name: str,
    avatar_name: str,
    audio_path: Path | None,
    fps: float,
    width: int,
    height: int,
    models_dir: Path | None = None,
    device: str | None = None,
    random_weights: bool = False,
) -> dict:
    audio_path = audio_path or SAMPLE_AUDIO
    if engine_name == "musetalk":  # per-stage model timings instead of a render
        from livecam.engines.musetalk.bench import run_musetalk_bench
        from livecam.engines.musetalk.weights import WeightsError
        from livecam.session import EngineError

        try:
            return run_musetalk_bench(
                avatar_name, audio_path, fps, models_dir, device, random_weights
            )
        except WeightsError as exc:
            raise EngineError(str(exc)) from None
    audio = read_audio(audio_path)
    avatar = load_avatar(avatar_name)

    def fresh():
        return (
            build_engine(engine_name, avatar, fps),
            build_compositor(avatar, width, height, fps),
        )

    # 0. untimed: a fresh process pays once for the memory it first touches (page faults
    # while the allocator's heap grows; the first ~16 frames); the figures are per frame
    render_audio(audio[: round(WARM_UP_S * SAMPLE_RATE)], *fresh(), MemorySink(width, height, fps))
    # 1. engine + compositing per frame, no encoding (memory sink)
    engine, compositor = fresh()
    memory = render_audio(audio, engine, compositor, MemorySink(width, height, fps))
    # 2. the full offline render to an mp4, encoding and muxing included
    engine, compositor = fresh()
    with tempfile.TemporaryDirectory() as tmp:
        sink, _ = open_sink(
            "file",
            SinkSettings(
                width=width, height=height, fps=fps, out=Path(tmp) / "b.mp4", soundtrack=audio
            ),
        )
        t0 = time.perf_counter()
        rendered = render_audio(audio, engine, compositor, sink)
        render_s = time.perf_counter() - t0
    camera = camera_sink_cost(compositor.compose(engine.generate_silent([0])[0], 0), fps)
    return {
        "camera_sink": camera,
        "engine": engine_name,
        "avatar": avatar_name,
        "size": f"{width}x{height}",
        "fps": fps,
        "audio": str(audio_path),
        "audio_seconds": round(rendered.audio_seconds, 3),
        "frames": rendered.frames,
        "frame_ms": _percentiles(memory.frame_ms),
        "frames_per_second_no_encoding": round(memory.frames / memory.seconds, 1),
        "render_seconds": round(render_s, 3),
        "render_realtime_factor": round(render_s / rendered.audio_seconds, 3),
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
