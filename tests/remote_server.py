"""`livecam serve` for tests: the token, a free port, and a live client run against a server
(the session's Ray Serve app is the `server` fixture in conftest.py)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from livecam.pipeline.stats import Snapshot
from livecam.remote.client import LinkStats
from tests.conftest import JFK

TOKEN = "test-token-" + "x" * 24
FPS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_live(url: str, token_file: Path, seconds: float) -> tuple[Snapshot, LinkStats]:
    """`livecam start --remote URL --remote-only` into a memory sink for `seconds`."""
    from livecam.live import LiveOptions, build_pipeline, close_engine

    opts = LiveOptions(avatar="astronaut", sink="memory", audio_file=JFK, loop=True, width=320,
                       height=240, dashboard=False, remote=url, token_file=token_file,
                       remote_only=True)  # fmt: skip
    pipeline = build_pipeline(opts)
    pipeline.start()
    try:
        time.sleep(seconds)
        snap = pipeline.snapshot()
    finally:
        pipeline.stop()
        close_engine(pipeline.engine)
    return snap, pipeline.engine.link.stats
