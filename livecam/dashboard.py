"""The terminal dashboard: a pure render function of a pipeline Snapshot."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from livecam.pipeline.stats import Snapshot

METER_WIDTH = 30
METER_FLOOR_DB = -60.0


def level_meter(level_db: float, width: int = METER_WIDTH) -> Text:
    """A bar from METER_FLOOR_DB to 0 dBFS; green, then yellow, red near clipping."""
    fill = round(width * min(max((level_db - METER_FLOOR_DB) / -METER_FLOOR_DB, 0.0), 1.0))
    bar = Text()
    for i in range(width):
        style = "green" if i < width * 0.7 else "yellow" if i < width * 0.9 else "red"
        bar.append("█" if i < fill else "·", style=style if i < fill else "dim")
    bar.append(f" {max(level_db, -99):5.1f} dBFS")
    return bar


def _fps_style(shown: float, target: float) -> str:
    return "green" if shown >= 0.97 * target else "yellow" if shown >= 0.8 * target else "red"


def render(s: Snapshot) -> Panel:
    """The whole dashboard for one snapshot."""
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold cyan", justify="right")
    info.add_column()
    info.add_row("avatar", Text(s.avatar))  # names are shown as they are, never as markup
    every = "every frame" if s.stride == 1 else f"every {s.stride}. frame"
    info.add_row("engine", f"{s.engine} · tier {s.tier} · {every} · batch {s.batch}")
    if s.remote:
        info.add_row("server", Text(s.remote))
    info.add_row("camera", Text(s.sink))
    info.add_row("microphone", Text(s.source))
    info.add_row("level", level_meter(s.level_db))
    info.add_row(
        "fps",
        Text.assemble(
            (f"{s.shown_fps:5.1f} shown", _fps_style(s.shown_fps, s.target_fps)),
            f" / {s.target_fps:g} target, {s.generated_fps:5.1f} generated",
        ),
    )
    info.add_row(
        "reused",
        f"{s.skip_ratio:6.1%} of {s.frames_shown} frames shown reuse a mouth "
        f"({s.frames_held} held by stride, {s.frames_repeated} late)",
    )
    measured = s.stages_ms.get("latency")
    seen = f"; shown frames {measured[0]:.0f}/{measured[1]:.0f} ms p50/p95" if measured else ""
    info.add_row(
        "latency",
        f"{s.latency_ms:5.0f} ms mic-to-frame (playout delay {s.playout_delay_ms:.0f} ms{seen})",
    )
    if s.capture_granted_ms:  # a microphone was opened (a file has no input latency)
        info.add_row(
            "capture",
            f"{s.capture_ms:5.0f} ms measured ({s.capture_basis}); asked "
            f"{s.capture_requested_ms:.0f} ms, device reports {s.capture_granted_ms:.0f} ms",
        )
    info.add_row("queue", f"{s.queue_depth}/{s.queue_capacity} frames, {s.queue_drops} dropped")
    info.add_row(
        "counts",
        f"{s.frames_generated} generated ({s.frames_late} after their tick), "
        f"{s.frames_skipped} skipped late, "
        f"{s.frames_silent} idle, {s.audio_overruns} audio overruns, "
        f"{s.late_ticks} late ticks",
    )

    stages = Table(title="time per frame", title_justify="left", box=None, padding=(0, 2))
    stages.add_column("stage", style="cyan")
    stages.add_column("p50 ms", justify="right")
    stages.add_column("p95 ms", justify="right")
    for name, (p50, p95) in sorted(s.stages_ms.items()):
        if name == "latency":
            continue
        stages.add_row(name, f"{p50:.2f}", f"{p95:.2f}")

    parts: list = [info, Text(), stages]
    for warning in s.warnings:
        parts.append(Text(f"⚠ {warning}", style="bold yellow"))
    title = f"livecam · up {int(s.uptime_s // 60)}:{int(s.uptime_s % 60):02d}"
    return Panel(Group(*parts), title=title, subtitle="Ctrl-C to stop", border_style="blue")
