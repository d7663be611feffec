"""`livecam service install|uninstall`."""

from __future__ import annotations

from typing import Annotated

import typer

from livecam.terminal import console, print_error

service_app = typer.Typer(
    help="Run livecam as a systemd user service (starts with your session).", no_args_is_help=True
)


@service_app.command("install")
def service_install(
    camera: Annotated[str, typer.Option(help="The v4l2loopback device.")] = "/dev/video10",
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start it now too.")] = True,
) -> None:
    """Write the user unit (ExecStart: this livecam), enable it, and start it."""
    from livecam.service.unit import ServiceError, install

    try:
        outcome = install(camera, start=start)
    except ServiceError as exc:
        print_error(exc)
        raise typer.Exit(1) from None
    console.print(f"installed {outcome.unit}", highlight=False)
    for command in outcome.done:
        console.print(f"  ran: {command}", highlight=False)
    console.print(
        "Options come from ~/.config/livecam/config.toml ([start] table). "
        "Status: `systemctl --user status livecam`; logs: `journalctl --user -u livecam -f`.",
        highlight=False,
    )


@service_app.command("uninstall")
def service_uninstall() -> None:
    """Stop and disable the user service and remove its unit."""
    from livecam.service.unit import ServiceError, uninstall, unit_path

    try:
        outcome = uninstall()
    except ServiceError as exc:
        print_error(exc)
        raise typer.Exit(1) from None
    if outcome is None:
        console.print(f"not installed: there is no {unit_path()}", highlight=False)
        return
    for command in outcome.done:
        console.print(f"  ran: {command}", highlight=False)
    console.print(f"removed {outcome.unit}", highlight=False)
