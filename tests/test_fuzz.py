"""Fuzzing the two inputs anyone can write to: the control socket and the config file.
Small fixed budgets (max_examples, no deadline, no example database) keep this under 20 s."""

from __future__ import annotations

import datetime
import json
import math
import socket
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from livecam.cli import app
from livecam.control import ControlServer
from livecam.live import _control_handlers

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12))  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["status", "mute", "stop", "avatar", "bogus"]) | json_values},
    optional={"on": json_values, "name": json_values},
)
lines = (messages.map(lambda m: json.dumps(m).encode())
         | json_values.map(lambda v: json.dumps(v).encode())
         | st.binary(max_size=200))  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A control server with the daemon's real stop and mute handlers."""
    pipeline, mic = SimpleNamespace(muted=False), SimpleNamespace(muted=False)
    handlers = _control_handlers(pipeline, mic, threading.Event(), None)  # type: ignore[arg-type]
    handlers = {
        "status": lambda _: {"ok": True},
        "stop": handlers["stop"],
        "mute": handlers["mute"],
    }
    folder = tmp_path_factory.mktemp("fuzz-run")
    folder.chmod(0o700)
    server = ControlServer(handlers, folder / "livecam.sock")
    server.start()
    yield server, pipeline
    server.stop()


def _ask(path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(line.replace(b"\n", b" ") + b"\n")
        return conn.makefile("rb").readline()


@FUZZ
@given(line=lines)
def test_every_request_gets_one_json_answer(daemon, line):
    server, pipeline = daemon
    answer = json.loads(_ask(server.path, line))
    assert isinstance(answer, dict) and answer
    assert set(answer) <= {"error", "ok", "stopping", "muted"}
    assert isinstance(pipeline.muted, bool)  # "false", 0, [] never mute
    assert server._thread.is_alive()


def _answer_or_close(conn: socket.socket) -> bytes:
    """What the server sends before it closes: a reset after a complete line (the server left
    the rest of the request unread) still counts as that line."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


@settings(FUZZ, max_examples=300)
@given(
    chunks=st.lists(st.binary(max_size=300) | lines | st.binary(min_size=4000, max_size=9000),
                    max_size=4),
    hang_up=st.booleans(),
)  # fmt: skip
def test_any_byte_stream_gets_one_answer_or_a_clean_close(daemon, chunks, hang_up):
    server, _ = daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(server.path))
        try:
            for chunk in chunks:
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)  # the end of the request, newline or not
        except OSError:  # the server answered a line (or a cap) and closed: allowed
            pass
        if not hang_up:  # else: gone without reading the answer
            data = _answer_or_close(conn)
            assert data == b"" or (data.endswith(b"\n") and data.count(b"\n") == 1), data
            if data:
                assert isinstance(json.loads(data), dict)
    assert _ask(server.path, b'{"cmd": "status"}') == b'{"ok": true}\n'
    assert server._thread.is_alive()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)  # fmt: skip
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        pairs = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


toml_scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
                | st.text(max_size=12) | st.dates() | st.times())  # fmt: skip
config_tables = st.dictionaries(
    st.sampled_from(["start", "render", "bench", "status", "mute", "avatars", "nope"]),
    st.dictionaries(
        st.sampled_from(
            [
                "fps",
                "size",
                "port",
                "avatar",
                "loop",
                "virtual-mic",
                "audio",
                "duration",
                "sink",
                "idle",
                "engine",
                "typo",
            ]
        ),
        toml_scalars
        | st.lists(toml_scalars, max_size=2)
        | st.dictionaries(st.text(max_size=4), toml_scalars, max_size=2),
        max_size=4,
    ),
    max_size=3,
)


def _toml(tables: dict) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
                   for name, keys in tables.items())  # fmt: skip


@settings(FUZZ, max_examples=80)  # each example runs the CLI's startup: the slower one
@given(text=config_tables.map(_toml) | st.text(max_size=200))
def test_any_config_file_is_used_or_named_in_one_line(tmp_path, monkeypatch, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("LIVECAM_CONFIG", str(path))
    result = CliRunner().invoke(app, ["status", "--help"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 2)
    if result.exit_code == 2:
        assert str(path) in result.output and "Traceback" not in result.output
    else:  # used: every value is a plain one its option takes as it is
        for table in tomllib.loads(text).values():
            assert all(isinstance(v, str | int | float | bool) for v in table.values())
