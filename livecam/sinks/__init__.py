"""Output sinks: virtual camera, browser preview, mp4 file, memory."""

from __future__ import annotations

from pathlib import Path

from livecam.sinks.base import Sink, SinkError, check_frame

SINK_KINDS = ("auto", "virtualcam", "preview", "file", "memory")

__all__ = ["SINK_KINDS", "Sink", "SinkError", "check_frame", "open_sink"]


def open_sink(
    kind: str,
    *,
    width: int,
    height: int,
    fps: float,
    device: str | None = None,
    backend: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    out: Path | None = None,
) -> tuple[Sink, list[str]]:
    """Open the sink `kind`; return it with warnings for the user."""
    # Imports are local so that e.g. the file sink does not load the camera library.
    if kind == "virtualcam":
        from livecam.sinks.virtualcam import VirtualCamSink

        sink = VirtualCamSink(width, height, fps, device=device, backend=backend, wait=True)
        return sink, []
    if kind == "preview":
        from livecam.sinks.preview import PreviewSink

        return PreviewSink(width, height, fps, host=host, port=port), []
    if kind == "file":
        if out is None:
            raise SinkError("--out PATH is required with --sink file")
        from livecam.sinks.file import FileSink

        return FileSink(out, width, height, fps), []
    if kind == "memory":
        from livecam.sinks.memory import MemorySink

        return MemorySink(width, height, fps), []
    if kind == "auto":
        return _open_auto(width, height, fps, device, backend, host, port)
    raise SinkError(f"unknown sink {kind!r}; choose one of {', '.join(SINK_KINDS)}")


def _open_auto(
    width: int,
    height: int,
    fps: float,
    device: str | None,
    backend: str | None,
    host: str,
    port: int,
) -> tuple[Sink, list[str]]:
    """The virtual camera if it opens, else the browser preview with a warning."""
    from livecam.sinks.preview import PreviewSink
    from livecam.sinks.virtualcam import MODPROBE, VirtualCamSink

    try:
        return VirtualCamSink(width, height, fps, device=device, backend=backend), []
    except SinkError as e:
        reason = str(e)
    if MODPROBE not in reason:
        reason += f"; to create the LiveCam device run `{MODPROBE}`"
    sink = PreviewSink(width, height, fps, host=host, port=port)
    return sink, [f"virtual camera unavailable: {reason}", f"showing the preview at {sink.url}"]
