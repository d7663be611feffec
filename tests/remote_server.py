"""`livecam serve` for tests: the token, a free port, and a live client run against a server
(the session's Ray Serve app is the `server` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from livecam.pipeline.runner import Pipeline
from livecam.pipeline.stats import Snapshot
from livecam.remote.client import LinkStats
from tests.conftest import JFK, REPO

TOKEN = "test-token-" + "x" * 24
FPS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_client(url: str, token_file: Path) -> Iterator[Pipeline]:
    """`livecam start --remote URL --remote-only` into a memory sink, running while open."""
    from livecam.live import LiveOptions, build_pipeline, close_engine

    opts = LiveOptions(avatar="astronaut", sink="memory", audio_file=JFK, loop=True, width=320,
                       height=240, dashboard=False, remote=url, token_file=token_file,
                       remote_only=True)  # fmt: skip
    pipeline = build_pipeline(opts)
    pipeline.start()
    try:
        yield pipeline
    finally:
        pipeline.stop()
        close_engine(pipeline.engine)


def run_live(url: str, token_file: Path, seconds: float) -> tuple[Snapshot, LinkStats]:
    """A live client for `seconds`: what it showed, and its link's counts."""
    with live_client(url, token_file) as pipeline:
        time.sleep(seconds)
        snap = pipeline.snapshot()
    return snap, pipeline.engine.link.stats


def start_serve(
    token_file: Path, port: int, *options: str, env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """`livecam serve` in a process of its own, and its output up to the line with its URL
    (all of it, if it ended first; what came, if `timeout` passed first: then it is killed)."""
    command = ["serve", "--token-file", str(token_file), "--port", str(port), *options]
    proc = subprocess.Popen(
        [sys.executable, "-m", "livecam", *command], cwd=REPO, env=env or dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    shown = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if f"ws://127.0.0.1:{port}" in line:
                break
        shown.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not shown.wait(timeout):
        proc.kill()
        reader.join(10)
        lines.append(f"[not up after {timeout:.0f} s: killed]\n")
    return proc, "".join(lines)


class Relay:
    """A TCP relay from a port of its own to `target`, listening only once started: a server
    that comes up after its clients."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                server = socket.create_connection(self.target)
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
