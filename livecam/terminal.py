"""The consoles every command prints to, the one-line error format, and the exit codes."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def print_plain(text: str) -> None:
    """A line printed as it is: paths and names are never markup, nor broken mid-word."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_error(message: object) -> None:
    """One red "error:" line; the message is printed as is (no markup: paths, [tables])."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)


def _user_errors() -> tuple[type[Exception], ...]:
    from livecam.audio.files import AudioFileError
    from livecam.audio.portaudio import PortAudioMissing
    from livecam.audio.sources import AudioDeviceError
    from livecam.audio.virtual_mic import VirtualMicError
    from livecam.avatar.store import AvatarError
    from livecam.control import ControlError
    from livecam.engines.musetalk import ExtraMissing
    from livecam.remote.tokens import TokenError
    from livecam.session import EngineError
    from livecam.sinks.base import SinkError

    return (AudioFileError, AudioDeviceError, AvatarError, EngineError, SinkError,
            VirtualMicError, ControlError, ExtraMissing, TokenError, PortAudioMissing)  # fmt: skip


def run_action(action: Callable[[], int | None]) -> None:
    """Run a command's action; user-facing errors become one clear line and exit code 1."""
    try:
        code = action()
    except _user_errors() as exc:
        print_error(exc)
        raise typer.Exit(1) from None
    raise typer.Exit(code or 0)
