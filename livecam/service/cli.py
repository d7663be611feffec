"""`livecam service install|uninstall`."""

from __future__ import annotations

from typing import Annotated

import typer

from livecam.terminal import print_error, print_plain

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
    print_plain(f"installed {outcome.unit}")
    for command in outcome.done:
        print_plain(f"  ran: {command}")
    print_plain(
        "Options come from ~/.config/livecam/config.toml ([start] table). "
        "Status: `systemctl --user status livecam`; logs: `journalctl --user -u livecam -f`."
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
        print_plain(f"not installed: there is no {unit_path()}")
        return
    for command in outcome.done:
        print_plain(f"  ran: {command}")
    print_plain(f"removed {outcome.unit}")
