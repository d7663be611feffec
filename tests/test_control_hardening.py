"""The control socket under abuse: busy, stalled, crashed, flooded, out of descriptors,
or in a runtime directory that is not the user's own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from livecam import control
from livecam.control import ControlError, ControlServer, request


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def server(run_dir: Path):
    release = threading.Event()

    def slow(_: dict) -> dict:
        release.wait(30)
        return {"slow": True}

    def boom(_: dict) -> dict:
        raise RuntimeError("handler bug")

    srv = ControlServer({"status": lambda _: {"ok": True}, "slow": slow, "boom": boom},
                        run_dir / "livecam.sock")  # fmt: skip
    srv.start()
    srv.release = release  # type: ignore[attr-defined]
    yield srv
    release.set()
    srv.stop()


def _idle_client(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    return conn


def test_idle_and_trickling_clients_do_not_delay_status(server):
    idle = [_idle_client(server.path) for _ in range(5)]
    trickle = _idle_client(server.path)
    trickle.send(b'{"cmd"')
    try:
        # One at a time with a 2 s read timeout, five idle clients held status for 10 s.
        for _ in range(3):
            assert request({"cmd": "status"}, server.path, timeout=1.5) == {"ok": True}
    finally:
        for conn in [*idle, trickle]:
            conn.close()


def test_a_slow_handler_does_not_block_others(server):
    answers: list[dict] = []
    slow = threading.Thread(target=lambda: answers.append(request({"cmd": "slow"}, server.path)))
    slow.start()
    time.sleep(0.2)
    assert request({"cmd": "status"}, server.path, timeout=1.5) == {"ok": True}
    assert slow.is_alive()  # still working on its own thread
    server.release.set()
    slow.join(10)
    assert answers == [{"slow": True}]


def test_a_client_trickling_bytes_is_cut_at_the_deadline(server, monkeypatch):
    monkeypatch.setattr(control, "REQUEST_DEADLINE_S", 0.5)
    conn = _idle_client(server.path)
    conn.settimeout(0.2)
    closed = False
    for _ in range(40):  # 8 s of one byte every 0.2 s; a per-recv timeout never fires
        try:
            conn.send(b" ")
            if conn.recv(100) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:
            closed = True
            break
    conn.close()
    assert closed


def test_two_hundred_simultaneous_clients_are_all_answered(server):
    results: list[object] = []

    def work(_: dict) -> dict:
        time.sleep(0.02)  # a handler with some work to do: connections pile up meanwhile
        return {"ok": True}

    server.handlers["work"] = work

    def one() -> None:
        try:
            results.append(request({"cmd": "work"}, server.path, timeout=20))
        except ControlError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results.count({"ok": True}) == 200, [r for r in results if r != {"ok": True}][:3]


def test_connections_are_bounded(server, monkeypatch):
    monkeypatch.setattr(control, "SLOT_WAIT_S", 0.1)
    idle = [_idle_client(server.path) for _ in range(control.MAX_CLIENTS)]
    try:
        time.sleep(0.3)
        with pytest.raises(ControlError, match="busy"):
            request({"cmd": "status"}, server.path, timeout=5)
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.3)
    assert request({"cmd": "status"}, server.path) == {"ok": True}


def test_a_failing_handler_never_ends_the_server(server):
    for _ in range(3):
        with pytest.raises(ControlError, match="boom failed: handler bug"):
            request({"cmd": "boom"}, server.path)
    assert server._thread.is_alive()
    assert request({"cmd": "status"}, server.path) == {"ok": True}


def test_a_busy_daemon_is_never_taken_for_a_dead_one(server):
    idle = [_idle_client(server.path) for _ in range(3)]
    try:
        second = ControlServer({}, server.path)
        with pytest.raises(ControlError, match="already running"):
            second.start()
        second.stop()
        assert server.path.exists()  # the first daemon's socket is untouched
        assert request({"cmd": "status"}, server.path, timeout=1.5) == {"ok": True}
    finally:
        for conn in idle:
            conn.close()


def test_stop_removes_only_its_own_socket(server):
    moved = server.path.with_name("moved.sock")
    server.path.rename(moved)
    server.path.write_text("someone else's file")
    server.stop()
    assert server.path.read_text() == "someone else's file"


def test_runtime_dir_is_created_private(tmp_path):
    path = tmp_path / "a" / "run"
    srv = ControlServer({"status": lambda _: {}}, path / "livecam.sock")
    srv.start()
    srv.stop()
    assert (path.stat().st_mode & 0o777) == 0o700
    assert not (path / "livecam.sock").exists()


@pytest.mark.parametrize("problem", ["symlink", "mode", "file", "owner"])
def test_an_unsafe_runtime_dir_is_refused(tmp_path, problem):
    path = tmp_path / "run"
    if problem == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    elif problem == "file":
        path.write_text("")
    else:
        path.mkdir(mode=0o700)
        if problem == "mode":
            path.chmod(0o755)
        else:
            if os.getuid() != 0:
                pytest.skip("changing a directory's owner needs root")
            os.chown(path, 65534, 65534)
    fake = ControlServer({"status": lambda _: {"fake": True}}, path / "livecam.sock")
    with pytest.raises(ControlError, match=f"refusing the runtime directory {path}"):
        fake.start()
    with pytest.raises(ControlError, match="refusing the runtime directory"):
        request({"cmd": "stop"}, path / "livecam.sock")  # never sent to a fake daemon


DAEMON = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from livecam.control import ControlServer
    ControlServer({"status": lambda _: {"pid": 1}}, Path(sys.argv[1])).start()
    print("up", flush=True)
    time.sleep(120)
""")


def test_start_after_a_killed_daemon_works(run_dir):
    path = run_dir / "livecam.sock"
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, str(path)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "up"
        with pytest.raises(ControlError, match="already running"):
            ControlServer({}, path).start()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert path.exists()  # left behind by the crash
    with pytest.raises(ControlError, match="not running"):
        request({"cmd": "status"}, path)
    srv = ControlServer({"status": lambda _: {"ok": True}}, path)
    srv.start()
    try:
        assert request({"cmd": "status"}, path) == {"ok": True}
    finally:
        srv.stop()


FD_EXHAUSTION = textwrap.dedent("""
    import os, resource, sys
    from pathlib import Path
    from livecam.control import ControlServer
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    srv = ControlServer({"status": lambda _: {"ok": True}}, Path(sys.argv[1]))
    srv.start()
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    sys.stdin.readline()  # the test's client now waits in the backlog: accept fails
    for fd in filler:
        os.close(fd)
    print("freed", flush=True)
    sys.stdin.readline()
    srv.stop()
""")


def test_the_server_survives_running_out_of_descriptors(run_dir):
    path = run_dir / "livecam.sock"
    proc = subprocess.Popen([sys.executable, "-c", FD_EXHAUSTION, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "full"
        answers: list[object] = []

        def ask() -> None:
            try:
                answers.append(request({"cmd": "status"}, path, timeout=15))
            except ControlError as exc:
                answers.append(str(exc))

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(1.0)  # several accepts fail with EMFILE meanwhile
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        client.join(20)
        assert answers == [{"ok": True}]
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_mute_takes_only_true_or_false():
    from livecam.live import _control_handlers

    pipeline, mic = SimpleNamespace(muted=False), SimpleNamespace(muted=False)
    handlers = _control_handlers(pipeline, mic, threading.Event(), None)  # type: ignore[arg-type]
    for bad in ("false", "true", 0, 1, None, [], {}):
        with pytest.raises(ControlError, match='"on" must be true or false'):
            handlers["mute"]({"cmd": "mute", "on": bad})
        assert pipeline.muted is False and mic.muted is False
    assert handlers["mute"]({"cmd": "mute", "on": True}) == {"muted": True}
    assert handlers["mute"]({"cmd": "mute"}) == {"muted": True}
    assert handlers["mute"]({"cmd": "mute", "on": False}) == {"muted": False}
    with pytest.raises(ControlError, match="name"):
        handlers["avatar"]({"cmd": "avatar", "name": 5})


def test_a_garbage_answer_is_a_clear_error(run_dir):
    path = run_dir / "livecam.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"not json\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ControlError, match="no valid answer"):
            request({"cmd": "status"}, path)
        thread.join(5)


def test_the_reply_is_one_json_line(server):
    with _idle_client(server.path) as conn:
        conn.sendall(b'{"cmd": "nope"}\n')
        reply = conn.makefile("rb").readline()
    assert json.loads(reply)["error"].startswith("bad request; commands: boom, slow, status")


def test_an_overlong_request_is_answered_as_such(server):
    # 5 MB outgrows the socket's buffer: the daemon answers and closes while it is still
    # being sent (a broken pipe here), and the answer is still there to read
    for size in (control.MAX_REQUEST, 100_000, 5_000_000):
        with _idle_client(server.path) as conn:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(b'{"cmd": "status", "pad": "' + b"x" * size + b'"}\n')
            reply = conn.makefile("rb").readline()  # the rest unread: then a reset, no hang
        too_long = f"request longer than {control.MAX_REQUEST - 1} bytes"
        assert json.loads(reply) == {"error": too_long}
    longest = b'{"cmd": "status", "pad": "' + b"x" * (control.MAX_REQUEST - 29) + b'"}'
    assert len(longest) == control.MAX_REQUEST - 1
    with _idle_client(server.path) as conn:
        conn.sendall(longest + b"\n")
        assert json.loads(conn.makefile("rb").readline()) == {"ok": True}


def test_an_uncreatable_runtime_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError, match="cannot create the runtime directory"):
        ControlServer({}, tmp_path / "file" / "run" / "livecam.sock").start()


def test_status_answers_while_an_avatar_is_built(run_dir, monkeypatch):
    """A switch that prepares an avatar runs on its own thread; a second one is refused at once
    instead of queueing behind it (queued switches would fill every connection slot)."""
    from livecam import live

    building, release = threading.Event(), threading.Event()

    def slow_build(pipeline: object, name: str, opts: object) -> str:
        building.set()
        assert release.wait(30)
        return f"look of {name}"

    monkeypatch.setattr(live, "build_look", slow_build)
    shown: list[str] = []
    pipeline = SimpleNamespace(muted=False, switch=shown.append)
    mic = SimpleNamespace(muted=False)
    handlers = live._control_handlers(pipeline, mic, threading.Event(), None)  # type: ignore[arg-type]
    handlers["status"] = lambda _: {"ok": True}
    srv = ControlServer(handlers, run_dir / "livecam.sock")
    srv.start()
    answers: list[object] = []
    ask = {"cmd": "avatar", "name": "portrait"}
    switch = threading.Thread(target=lambda: answers.append(request(ask, srv.path, timeout=30)))
    try:
        switch.start()
        assert building.wait(10)
        for _ in range(3):
            assert request({"cmd": "status"}, srv.path, timeout=1.5) == {"ok": True}
        with pytest.raises(ControlError, match="another avatar switch is in progress"):
            request({"cmd": "avatar", "name": "astronaut"}, srv.path, timeout=1.5)
        assert request({"cmd": "mute", "on": True}, srv.path, timeout=1.5) == {"muted": True}
        assert shown == []
        release.set()
        switch.join(30)
        assert answers == [{"avatar": "portrait"}] and shown == ["look of portrait"]
    finally:
        release.set()
        srv.stop()
