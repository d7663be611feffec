"""`livecam serve` (loads Ray only when run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer


def serve_command(
    token_file: Annotated[
        Path, typer.Option(help="Clients' shared token; created (mode 0600) if missing.")
    ],
    engine: Annotated[str, typer.Option(help="Engine the pool runs: lite | musetalk.")] = "lite",
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Generator replicas, fixed (default: musetalk one per GPU of the cluster, "
            "following GPU machines as they join and leave; else 1); more than the GPUs share "
            "them evenly.",
            min=1,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            help="With --engine musetalk: its weights (default: $LIVECAM_MODELS_DIR, "
            "else ~/.local/share/livecam/models, as `livecam models`)."
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(help="With --engine musetalk: full-size random weights (benchmarks)."),
    ] = False,
    tiny: Annotated[
        bool, typer.Option(help="With --random-weights: toy-size models (a dry run).")
    ] = False,
    status_every: Annotated[
        float,
        typer.Option(
            help="Print the pool's streams, faces/s and batches every S s (0: off).", min=0
        ),
    ] = 10.0,
) -> None:
    """Generate faces for remote `livecam start --remote` clients on a Ray Serve pool."""
    from livecam.terminal import print_plain, run_action

    def action() -> int:
        from livecam.session import EngineError

        if importlib.util.find_spec("ray") is None:
            raise EngineError("livecam serve needs Ray Serve: pip install 'livecam[serve]'")
        if engine == "musetalk" and importlib.util.find_spec("torch") is None:
            raise EngineError("--engine musetalk needs: pip install 'livecam[serve,musetalk]'")
        if (random_weights or tiny) and engine != "musetalk":
            raise EngineError("--random-weights and --tiny go with --engine musetalk")
        if tiny and not random_weights:
            raise EngineError("--tiny goes with --random-weights")
        from livecam.remote.server import ServeOptions, run_server

        size = ("tiny" if tiny else "full") if random_weights else None
        opts = ServeOptions(token_file, engine, replicas, host, port, models_dir, address, size,
                            status_every)  # fmt: skip
        # one line each, never wrapped at the terminal's width: they end up in logs
        return run_server(opts, say=print_plain)

    run_action(action)
