"""Output sinks: virtual camera, browser preview, mp4 file, memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from livecam.sinks.base import Sink, SinkError, check_frame

if TYPE_CHECKING:
    import numpy as np

    from livecam.sinks.preview import PreviewSink

__all__ = ["SINK_KINDS", "Sink", "SinkError", "SinkSettings", "check_frame", "open_sink"]


@dataclass(frozen=True)
class SinkSettings:
    width: int
    height: int
    fps: float
    device: str | None = None  # virtual camera
    backend: str | None = None
    host: str = "127.0.0.1"  # preview
    port: int = 8080
    out: Path | None = None  # file
    soundtrack: np.ndarray | None = None  # file: all the sound, when known ahead (a render)


# Each opener imports its sink itself, so that e.g. the file sink never loads the camera library.
def _virtualcam(s: SinkSettings) -> tuple[Sink, list[str]]:
    from livecam.sinks.virtualcam import VirtualCamSink

    sink = VirtualCamSink(s.width, s.height, s.fps, device=s.device, backend=s.backend, wait=True)
    return sink, []


def _preview(s: SinkSettings) -> tuple[Sink, list[str]]:
    from livecam.sinks.preview import PreviewSink

    return PreviewSink(s.width, s.height, s.fps, host=s.host, port=s.port), []


def _file(s: SinkSettings) -> tuple[Sink, list[str]]:
    if s.out is None:
        raise SinkError("--out PATH is required with --sink file")
    from livecam.sinks.file import FileSink

    return FileSink(s.out, s.width, s.height, s.fps, s.soundtrack), []


def _memory(s: SinkSettings) -> tuple[Sink, list[str]]:
    from livecam.sinks.memory import MemorySink

    return MemorySink(s.width, s.height, s.fps), []


PREVIEW_PORTS = 10  # auto's preview: its port or, where that is taken, one of the next ones


def _auto(s: SinkSettings) -> tuple[Sink, list[str]]:
    """The virtual camera if it opens, else the browser preview with a warning."""
    from livecam.sinks.virtualcam import MODPROBE, VirtualCamSink

    try:
        return VirtualCamSink(s.width, s.height, s.fps, device=s.device, backend=s.backend), []
    except SinkError as e:
        reason = str(e)
    if MODPROBE not in reason:
        reason += f"; to create the LiveCam device run `{MODPROBE}`"
    sink = _fallback_preview(s)
    taken = "" if sink.port == s.port else f" (port {s.port} is taken)"
    shown = f"showing the preview at {sink.url}{taken}"
    return sink, [f"virtual camera unavailable: {reason}", shown]


def _fallback_preview(s: SinkSettings) -> PreviewSink:
    """The preview on s.port or, where another program holds it, the next free one: a fallback
    that nobody asked for is no reason to stop."""
    from livecam.sinks.preview import PortInUse, PreviewSink

    port = s.port
    while True:
        try:
            return PreviewSink(s.width, s.height, s.fps, host=s.host, port=port)
        except PortInUse:
            if port == 0 or port == s.port + PREVIEW_PORTS - 1:
                raise
            port += 1


OPENERS: dict[str, Callable[[SinkSettings], tuple[Sink, list[str]]]] = {
    "auto": _auto,
    "virtualcam": _virtualcam,
    "preview": _preview,
    "file": _file,
    "memory": _memory,
}
SINK_KINDS = tuple(OPENERS)


def open_sink(kind: str, settings: SinkSettings) -> tuple[Sink, list[str]]:
    """Open the sink `kind`; return it with warnings for the user."""
    opener = OPENERS.get(kind)
    if opener is None:
        raise SinkError(f"unknown sink {kind!r}; choose one of {', '.join(SINK_KINDS)}")
    return opener(settings)
