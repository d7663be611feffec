"""The `livecam` command line."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from livecam.constants import DEFAULT_AVATAR, DEFAULT_FPS, DEFAULT_HEIGHT, DEFAULT_WIDTH
from livecam.limits import (
    DEFAULT_BURSTS,
    MAX_BURSTS,
    MAX_LOAD_FACTOR,
    MAX_RUN_SECONDS,
    MAX_STREAMS,
    LimitError,
    check_range,
)
from livecam.models_cli import ModelsDirOpt, features_command, models_app
from livecam.remote.cli import serve_command
from livecam.service.cli import service_app
from livecam.terminal import console, err_console, print_error, print_plain, run_action

app = typer.Typer(
    help="Turn your microphone into a talking face on a virtual webcam. "
    "Your defaults for any command: ~/.config/livecam/config.toml (see the README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
avatars_app = typer.Typer(
    help="List, prepare, show, switch and remove avatars.", no_args_is_help=True
)
app.add_typer(avatars_app, name="avatars")
app.add_typer(models_app, name="models")
app.add_typer(service_app, name="service")
app.command("features")(features_command)
app.command("serve")(serve_command)

SWITCH_TIMEOUT_S = 120.0  # a first switch may prepare the avatar (and its musetalk latents)


def _parse_size(size: str) -> tuple[int, int]:
    from livecam.limits import LimitError, check_size

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"{size!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    try:
        return check_size(width, height)
    except LimitError as exc:
        raise typer.BadParameter(str(exc), param_hint="--size") from None


def _check_size(size: str) -> str:
    _parse_size(size)
    return size


def _check_fps(fps: float) -> float:
    from livecam.limits import LimitError, check_fps

    try:
        return check_fps(fps)
    except LimitError as exc:
        raise typer.BadParameter(str(exc)) from None


def _in_range(
    low: float, high: float, *, low_open: bool = False
) -> Callable[[float | None], float | None]:
    """A callback for an optional float option: finite and within [low, high] (or (low, high])."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        try:
            return check_range(value, low, high, low_open=low_open)
        except LimitError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


REMOTE_CONNECTIONS = ("auto", "1", "2")


def _check_connections(value: str) -> str:
    value = value.strip().lower()
    if value not in REMOTE_CONNECTIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(REMOTE_CONNECTIONS)}")
    return value


def _connections(value: str) -> int | None:
    """--remote-connections as open_remote takes it (None: auto)."""
    return None if value == "auto" else int(value)


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
):
    """Logging, and the config file's defaults for the command about to run."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    from livecam.config import ConfigError, config_path, load_config

    commands = ctx.command.commands  # type: ignore[attr-defined]
    options = {name: {p.name for p in cmd.params if p.name}
               for name, cmd in commands.items() if not hasattr(cmd, "commands")}  # fmt: skip
    path = config_path()
    try:
        defaults = load_config(path, options)
        _check_config(ctx, path, defaults)
    except ConfigError as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    ctx.default_map = defaults  # flags still win


def _check_config(ctx: typer.Context, path: Path, defaults: dict[str, dict]) -> None:
    """Each configured value through its option's type and checks, so a bad one names the
    file and the key (click would blame the flag); `~` in a path is your home."""
    from livecam.config import ConfigError

    for command, values in defaults.items():
        cmd = ctx.command.commands[command]  # type: ignore[attr-defined]
        params, paths = {p.name: p for p in cmd.params}, _path_options(cmd.callback)
        for name, value in values.items():
            param, where = params[name], f"{path}: [{command}] {name.replace('_', '-')}"
            if isinstance(value, dict | list | datetime.date | datetime.time):
                # a str option would take str() of it: "{'a': 1}" as an avatar name
                raise ConfigError(f"{where} = {value!r}: expected one string, number or "
                                  "true/false")  # fmt: skip
            if name in paths and isinstance(value, str):
                value = values[name] = os.path.expanduser(value)  # as a shell would
            try:
                param.process_value(ctx, value)  # its type, range and callback
            except typer.BadParameter as exc:
                raise ConfigError(f"{where} = {value!r}: {exc.message}") from None


def _path_options(callback: Callable) -> set[str]:
    """The names of a command's options that take a path."""

    def types(hint: object) -> set[object]:
        return {hint}.union(*(types(arg) for arg in typing.get_args(hint)))

    hints = typing.get_type_hints(callback, include_extras=True)
    return {name for name, hint in hints.items() if Path in types(hint)}


AvatarOpt = Annotated[str, typer.Option(help="Avatar name (see `livecam avatars list`).")]
EngineOpt = Annotated[
    str, typer.Option(help="Lip-sync engine: lite (CPU, default) | musetalk (neural, GPU).")
]
TorchDeviceOpt = Annotated[
    str | None, typer.Option(help="musetalk: torch device, cuda | cpu (default: auto).")
]
FpsOpt = Annotated[float, typer.Option(help="Camera frame rate.", callback=_check_fps)]
SizeOpt = Annotated[str, typer.Option(help="Camera frame size WIDTHxHEIGHT.", callback=_check_size)]
IdleOpt = Annotated[bool, typer.Option("--idle/--no-idle", help="Blinks and head sway.")]
RemoteOpt = Annotated[
    str | None, typer.Option(help="Faces from the `livecam serve` pool at ws://HOST:PORT.")
]
_RUN_SECONDS = _in_range(0, MAX_RUN_SECONDS, low_open=True)
_LOAD = _in_range(0, MAX_LOAD_FACTOR)
TokenFileOpt = Annotated[
    Path | None, typer.Option(help="With --remote: the server's token file (a copy of it).")
]
RemoteConnectionsOpt = Annotated[
    str,
    typer.Option(
        metavar="auto|1|2",
        callback=_check_connections,
        help="With --remote: connections each call goes out on. 2 hides lost packets on a lossy "
        "network at twice the traffic; 1 for a metered or slow uplink; auto: 2 over a network, "
        "1 on loopback (2 helps through a forwarder with a TCP connection per connection, "
        "e.g. socat; not through an SSH tunnel).",
    ),
]


@app.command()
def start(
    avatar: AvatarOpt = DEFAULT_AVATAR,
    engine: EngineOpt = "lite",
    sink: Annotated[str, typer.Option(help="auto | virtualcam | preview | file")] = "auto",
    device: Annotated[str | None, typer.Option(help="Microphone name or index.")] = None,
    audio: Annotated[Path | None, typer.Option(help="Drive from an audio file instead.")] = None,
    loop: Annotated[bool, typer.Option(help="Repeat the --audio file.")] = False,
    camera: Annotated[str | None, typer.Option(help="Virtual camera, e.g. /dev/video10.")] = None,
    camera_backend: Annotated[str | None, typer.Option(help="pyvirtualcam backend.")] = None,
    fps: FpsOpt = DEFAULT_FPS,
    size: SizeOpt = f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}",
    port: Annotated[
        int, typer.Option(help="Preview port on 127.0.0.1 (0: any free).", min=0, max=65535)
    ] = 8080,
    out: Annotated[Path | None, typer.Option(help="Output mp4 for --sink file.")] = None,
    idle: IdleOpt = True,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard")] = True,
    duration: Annotated[
        float | None, typer.Option(help="Stop after N seconds.", callback=_RUN_SECONDS)
    ] = None,
    simulate_load: Annotated[
        float | None,
        typer.Option(help="Testing: each frame costs FACTOR frame budgets.", callback=_LOAD),
    ] = None,
    models_dir: ModelsDirOpt = None,
    torch_device: TorchDeviceOpt = None,
    virtual_mic: Annotated[
        bool, typer.Option(help='Publish "LiveCam Microphone": your voice in step with the face.')
    ] = False,
    remote: RemoteOpt = None,
    token_file: TokenFileOpt = None,
    remote_only: Annotated[
        bool, typer.Option(help="With --remote: exit if the server is unreachable at start.")
    ] = False,
    remote_connections: RemoteConnectionsOpt = "auto",
) -> None:
    """Run the live camera: microphone in, talking avatar out."""
    from livecam.live import LiveOptions, run

    width, height = _parse_size(size)
    opts = LiveOptions(
        avatar=avatar,
        engine=engine,
        sink=sink,
        mic=device,
        audio_file=audio,
        loop=loop,
        camera=camera,
        camera_backend=camera_backend,
        width=width,
        height=height,
        fps=fps,
        port=port,
        out=out,
        idle_motion=idle,
        dashboard=dashboard and sys.stdout.isatty(),
        duration=duration,
        simulate_load=simulate_load,
        virtual_mic=virtual_mic,
        models_dir=models_dir,
        torch_device=torch_device,
        remote=remote,
        token_file=token_file,
        remote_only=remote_only,
        remote_connections=_connections(remote_connections),
    )
    run_action(lambda: run(opts, console))


@app.command()
def render(
    audio: Annotated[Path, typer.Option(help="Speech audio file (WAV/FLAC/OGG).")],
    out: Annotated[Path, typer.Option(help="Output mp4.")],
    avatar: AvatarOpt = DEFAULT_AVATAR,
    engine: EngineOpt = "lite",
    fps: FpsOpt = DEFAULT_FPS,
    size: SizeOpt = f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}",
    idle: IdleOpt = True,
    models_dir: ModelsDirOpt = None,
    torch_device: TorchDeviceOpt = None,
    tier: Annotated[
        str | None,
        typer.Option(help="Quality tier: lite full|nearest, musetalk full|tiny (default: full)."),
    ] = None,
    remote: RemoteOpt = None,
    token_file: TokenFileOpt = None,
    remote_connections: RemoteConnectionsOpt = "auto",
) -> None:
    """Render an audio file to an mp4 offline, as fast as the machine allows."""
    from livecam.audio.files import read_audio
    from livecam.avatar.store import load_avatar
    from livecam.live import close_engine
    from livecam.session import (
        build_compositor,
        build_engine,
        build_remote,
        remote_token,
        render_audio,
    )
    from livecam.sinks import SinkSettings, open_sink

    width, height = _parse_size(size)

    def action() -> None:
        samples = read_audio(audio)
        face = load_avatar(avatar)
        if remote:
            # offline: wait for the server (30 s a call) rather than fall back to local frames
            eng = build_remote(remote, remote_token(token_file), face, fps, idle, remote_only=True,
                               reply_timeout_s=30.0,
                               connections=_connections(remote_connections))  # fmt: skip
        else:
            eng = build_engine(
                engine, face, fps, idle, models_dir=models_dir, device=torch_device, streaming=False
            )
        if tier is not None:
            try:
                eng.set_tier(tier)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--tier") from None
        comp = build_compositor(face, width, height, fps, idle)
        settings = SinkSettings(width=width, height=height, fps=fps, out=out, soundtrack=samples)
        sink, _ = open_sink("file", settings)
        try:
            result = render_audio(samples, eng, comp, sink)
        finally:
            close_engine(eng)
        print_plain(
            f"wrote {out}: {result.frames} frames, {result.audio_seconds:.1f} s of "
            f"audio in {result.seconds:.1f} s "
            f"({result.audio_seconds / result.seconds:.1f}x real time)"
        )

    run_action(action)


@app.command()
def devices() -> None:
    """List microphones (audio input devices)."""
    from livecam.audio.sources import input_devices

    def action() -> None:
        table = Table("index", "name", "channels", "default rate")
        for dev in input_devices():
            table.add_row(
                str(dev["index"]),
                escape(dev["name"]),
                str(dev["channels"]),
                f"{dev['default_samplerate']:.0f} Hz",
            )
        console.print(table)

    run_action(action)


@app.command()
def bench(
    engine: EngineOpt = "lite",
    avatar: AvatarOpt = DEFAULT_AVATAR,
    audio: Annotated[Path | None, typer.Option(help="Speech to render (default: bundled).")] = None,
    fps: FpsOpt = DEFAULT_FPS,
    size: SizeOpt = f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    models_dir: ModelsDirOpt = None,
    torch_device: TorchDeviceOpt = None,
    random_weights: Annotated[
        bool, typer.Option(help="musetalk: full-size random weights (no download needed).")
    ] = False,
    latency: Annotated[
        bool, typer.Option(help="Measure mic-to-frame latency (file source and PulseAudio).")
    ] = False,
    bursts: Annotated[
        int, typer.Option(help="With --latency: how many sound bursts.", min=1, max=MAX_BURSTS)
    ] = DEFAULT_BURSTS,
    soak: Annotated[
        float | None,
        typer.Option(
            help="Run the live pipeline this many seconds and report.", callback=_RUN_SECONDS
        ),
    ] = None,
    simulate_load: Annotated[
        float | None,
        typer.Option(
            help="With --soak/--latency: each frame costs FACTOR budgets.", callback=_LOAD
        ),
    ] = None,
    gpu_suite: Annotated[
        bool, typer.Option(help="musetalk: the GPU suite (fast paths on/off, streams, reference).")
    ] = False,
    tiny: Annotated[
        bool, typer.Option(help="With --gpu-suite: toy-size models (a dry run).")
    ] = False,
    reference: Annotated[
        Path | None, typer.Option(help="With --gpu-suite: a MuseTalk checkout to run beside it.")
    ] = None,
    streams: Annotated[
        int | None,
        typer.Option(
            help="Run N live streams at once (--soak seconds, default 10).", min=1, max=MAX_STREAMS
        ),
    ] = None,
    remote: RemoteOpt = None,
    token_file: TokenFileOpt = None,
    remote_connections: RemoteConnectionsOpt = "auto",
) -> None:
    """Measure engine, compositing and render speed (or live latency, or a long run)."""
    from livecam.bench import SAMPLE_AUDIO, run_bench

    width, height = _parse_size(size)

    def action() -> None:
        if engine == "musetalk" or gpu_suite:
            from livecam.engines.musetalk import require_extra

            require_extra()
        if remote or streams:
            from livecam.live import LiveOptions
            from livecam.remote.bench import streams_report

            opts = LiveOptions(
                avatar=avatar, engine=engine, width=width, height=height, fps=fps, audio_file=audio,
                dashboard=False, remote=remote, token_file=token_file, simulate_load=simulate_load,
                remote_connections=_connections(remote_connections),
            )  # fmt: skip
            report = streams_report(opts, streams or 1, soak or 10.0)
        elif gpu_suite:
            from livecam.engines.musetalk.gpu_suite import run_gpu_suite

            report = run_gpu_suite(avatar, audio or SAMPLE_AUDIO, torch_device, tiny, reference)
        elif latency or soak:
            from livecam.bench_live import live_report
            from livecam.live import LiveOptions

            opts = LiveOptions(
                avatar=avatar,
                engine=engine,
                width=width,
                height=height,
                fps=fps,
                dashboard=False,
                simulate_load=simulate_load,
                models_dir=models_dir,
                torch_device=torch_device,
            )
            report = live_report(opts, latency, soak, bursts)
        else:
            extra = {
                "models_dir": models_dir,
                "device": torch_device,
                "random_weights": random_weights,
            }
            report = run_bench(engine, avatar, audio, fps, width, height, **extra)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            console.print_json(json.dumps(report))

    run_action(action)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the running livecam's dashboard once (through its control socket)."""
    from livecam import dashboard
    from livecam.control import request
    from livecam.pipeline.stats import Snapshot

    def action() -> None:
        answer = request({"cmd": "status"})
        if as_json:
            print(json.dumps(answer, indent=2))
            return
        fields = {f: answer[f] for f in Snapshot.__dataclass_fields__ if f in answer}
        fields["stages_ms"] = {k: tuple(v) for k, v in fields["stages_ms"].items()}
        fields["warnings"] = tuple(fields["warnings"])
        console.print(dashboard.render(Snapshot(**fields)))

    run_action(action)


@app.command()
def stop() -> None:
    """Stop the running livecam (it closes the camera and finishes any recording)."""
    from livecam.control import request

    run_action(lambda: request({"cmd": "stop"}) and console.print("livecam is stopping"))


@app.command()
def mute(off: Annotated[bool, typer.Option("--off", help="Unmute.")] = False) -> None:
    """Keep the avatar idle (and the LiveCam Microphone silent) until `livecam mute --off`."""
    from livecam.control import request

    def action() -> None:
        answer = request({"cmd": "mute", "on": not off})
        console.print("muted" if answer["muted"] else "unmuted")

    run_action(action)


@app.command()
def doctor(
    ctx: typer.Context,
    camera: Annotated[bool, typer.Option("--camera", help="Only the virtual camera.")] = False,
    remote: Annotated[
        str | None,
        typer.Option(
            help="Also check the pool at ws://HOST:PORT (default: `remote` of [start] in "
            "config.toml, where set)."
        ),
    ] = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Check the camera device, microphone, tools, avatars and weights (and a remote pool);
    print the fixes."""
    from livecam.doctor import run_checks

    started = (ctx.find_root().default_map or {}).get("start", {})  # as `livecam start` would
    remote = remote or started.get("remote")
    token_file = token_file or started.get("token_file")
    failed = False
    token_path = Path(token_file) if token_file else None
    for check in run_checks(camera_only=camera, remote=remote, token_file=token_path):
        mark = "[green]ok[/]" if check.ok else "[red]FAIL[/]" if check.required else "[yellow]--[/]"
        console.print(
            f"{mark:>16}  [bold]{check.name}[/]: {escape(check.detail)}",
            highlight=False,
            soft_wrap=True,
        )
        failed = failed or (check.required and not check.ok)
    raise typer.Exit(1 if failed else 0)


@avatars_app.command("list")
def avatars_list() -> None:
    """Bundled and prepared avatars."""
    from livecam.avatar.store import list_avatars

    table = Table("name", "kind", "status", "source", "description")
    for info in list_avatars():
        source = escape(str(info.source or "unknown"))
        table.add_row(info.name, info.kind, info.status, source, escape(info.description))
    console.print(table)


@avatars_app.command("prepare")
def avatars_prepare(
    name: str,
    source: Annotated[
        Path,
        typer.Option("--from", help="A photo, or a short clip (first 3 s used), of one face."),
    ],
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache is fresh.")] = False,
) -> None:
    """Detect the face in a photo or clip and build the avatar cache."""
    from livecam.avatar.store import prepare_avatar

    def action() -> None:
        prepared = prepare_avatar(name, source, force=force)
        for warning in prepared.warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}")
        console.print(f"avatar {name!r} ready: start it with `livecam start --avatar {name}`")

    run_action(action)


@avatars_app.command("show")
def avatars_show(name: str, out: Annotated[Path, typer.Option(help="Write a PNG here.")]) -> None:
    """Write the avatar's neutral frame and mouth shapes as a PNG contact sheet."""
    from livecam.avatar.preview import contact_sheet
    from livecam.avatar.store import load_avatar

    def action() -> None:
        import cv2

        cv2.imwrite(str(out), contact_sheet(load_avatar(name)))
        print_plain(f"wrote {out}")

    run_action(action)


@avatars_app.command("switch")
def avatars_switch(name: str) -> None:
    """Show another avatar in the running livecam; the camera stays open."""
    from livecam.control import request

    def action() -> None:
        request({"cmd": "avatar", "name": name}, timeout=SWITCH_TIMEOUT_S)
        console.print(f"livecam now shows {name!r}")

    run_action(action)


@avatars_app.command("remove")
def avatars_remove(name: str) -> None:
    """Delete a prepared avatar's cache."""
    from livecam.avatar.store import remove_avatar

    run_action(lambda: remove_avatar(name))
