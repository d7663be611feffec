"""The consoles every command prints to, and the one-line error format."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def print_error(message: object) -> None:
    """One red "error:" line; the message is printed as is (no markup: paths, [tables])."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)
