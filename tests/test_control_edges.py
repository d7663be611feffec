"""The control socket's edges, in process: where the socket lives, the exact messages a user
sees, what a client does with odd answers, and a server whose accept() keeps failing."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from livecam import control
from livecam.control import ControlError, ControlServer, request
from livecam.pipeline.stats import Snapshot


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def test_the_runtime_dir_is_livecam_s_own_then_xdg_then_tmp(monkeypatch) -> None:
    monkeypatch.setenv("LIVECAM_RUNTIME_DIR", "/a")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/b")
    assert control.socket_path() == Path("/a/livecam.sock")
    monkeypatch.setenv("LIVECAM_RUNTIME_DIR", "")
    assert control.runtime_dir() == Path("/b")
    monkeypatch.delenv("LIVECAM_RUNTIME_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert control.runtime_dir() == Path(f"/tmp/livecam-{os.getuid()}")


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(0o755, "has mode 0755"), (0o710, "has mode 0710"), (0o701, "has mode 0701")],
)
def test_a_directory_others_can_enter_is_refused_by_its_mode(tmp_path, mode, problem) -> None:
    path = tmp_path / "run"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(ControlError) as caught:
        control.check_runtime_dir(path, create=False)
    assert str(caught.value) == (
        f"refusing the runtime directory {path}: it {problem}; it must be 0700. Remove it, or "
        "set XDG_RUNTIME_DIR (or LIVECAM_RUNTIME_DIR) to a private directory"
    )


def test_the_runtime_dir_is_checked_as_it_is(tmp_path) -> None:
    assert control.check_runtime_dir(tmp_path / "missing", create=False) is False
    assert not (tmp_path / "missing").exists()
    made = tmp_path / "a" / "b"
    assert control.check_runtime_dir(made, create=True) is True
    assert made.stat().st_mode & 0o777 == 0o700
    assert control.check_runtime_dir(made, create=True) is True  # already there: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError, match=r"it is not a directory\. Remove it"):
        control.check_runtime_dir(tmp_path / "file", create=False)
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(ControlError, match=r"it is a symlink\. Remove it"):
        control.check_runtime_dir(tmp_path / "link", create=False)


def test_an_unreadable_runtime_dir_is_one_line(tmp_path, monkeypatch) -> None:
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "lstat", refuse)
    with pytest.raises(ControlError) as caught:
        control.check_runtime_dir(tmp_path, create=False)
    assert str(caught.value) == f"cannot use the runtime directory {tmp_path}: Permission denied"


def test_an_uncreatable_runtime_dir_names_the_reason_and_the_fix(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError) as caught:
        control.check_runtime_dir(tmp_path / "file" / "run", create=True)
    assert str(caught.value) == (
        f"cannot create the runtime directory {tmp_path / 'file' / 'run'}: Not a directory; set "
        "LIVECAM_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a private, writable directory"
    )


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (errno.EROFS, "it is on a read-only filesystem"),
        (errno.ENXIO, "its filesystem does not support Unix sockets"),
        (errno.EOPNOTSUPP, "its filesystem does not support Unix sockets"),
        (errno.EPERM, "its filesystem does not support Unix sockets"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_why_a_socket_cannot_be_made_and_the_fix(tmp_path, code, why) -> None:
    path = tmp_path / "livecam.sock"
    message = control._unusable_runtime_dir(path, OSError(code, os.strerror(code)))
    assert message.startswith(f"cannot create the control socket {path}: {why}")
    assert message.endswith(
        "; point LIVECAM_RUNTIME_DIR (or XDG_RUNTIME_DIR) at a short, writable directory on a "
        "local filesystem or tmpfs, e.g. `export LIVECAM_RUNTIME_DIR=/dev/shm/livecam-$UID`"
    )


def test_an_error_without_strerror_is_still_named(tmp_path) -> None:
    message = control._unusable_runtime_dir(tmp_path / "s", OSError("odd failure"))
    assert f"{tmp_path / 's'}: odd failure;" in message


def test_a_socket_path_of_107_bytes_fits_and_108_does_not(tmp_path) -> None:
    def path(length: int) -> Path:
        base = os.fsencode(tmp_path / "x")
        return tmp_path / ("x" * (length - len(base) + 1))

    longest, too_long = path(control.MAX_SOCKET_PATH - 1), path(control.MAX_SOCKET_PATH)
    assert len(os.fsencode(too_long)) == control.MAX_SOCKET_PATH
    exc = OSError(errno.EACCES, "Permission denied")
    assert "longer than the 107 bytes" in control._unusable_runtime_dir(too_long, exc)
    assert "Permission denied" in control._unusable_runtime_dir(longest, exc)


def test_the_socket_is_private_and_the_umask_restored(run_dir) -> None:
    umask = os.umask(0o022)
    try:
        server = ControlServer({"status": lambda _: {"ok": True}}, run_dir / "livecam.sock")
        server.start()
        try:
            assert server.path.stat().st_mode & 0o777 == 0o600
            assert (run_dir / control.LOCK_NAME).stat().st_mode & 0o777 == 0o600
            assert os.umask(0o022) == 0o022  # start() gave the process its umask back
        finally:
            server.stop()
    finally:
        os.umask(umask)
    assert not server.path.exists() and not server._thread.is_alive()  # stop ended it


def test_stop_after_the_socket_was_removed(run_dir) -> None:
    server = ControlServer({}, run_dir / "livecam.sock")
    server.start()
    server.path.unlink()  # e.g. a user cleaning the runtime directory
    server.stop()
    assert not server._thread.is_alive()


def test_a_failed_bind_releases_the_lock(run_dir, monkeypatch) -> None:
    path = run_dir / "livecam.sock"

    def refuse(self, address):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    failed = ControlServer({}, path)
    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "bind", refuse)
        with pytest.raises(ControlError, match="read-only"):
            failed.start()
    failed.stop()  # what a daemon's shutdown does: nothing left to close
    server = ControlServer({"status": lambda _: {"ok": True}}, path)
    server.start()  # not "already running": the failed one let go of the lock
    try:
        assert request({"cmd": "status"}, path) == {"ok": True}
    finally:
        server.stop()
    again = ControlServer({}, path)  # and so did the stopped one
    again.start()
    again.stop()


def test_a_stale_socket_is_replaced(run_dir) -> None:
    path = run_dir / "livecam.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    server = ControlServer({"status": lambda _: {"ok": True}}, path)
    server.start()
    try:
        assert request({"cmd": "status"}, path) == {"ok": True}
    finally:
        server.stop()


def test_a_second_daemon_is_told_how_to_stop_the_first(run_dir) -> None:
    first = ControlServer({}, run_dir / "livecam.sock")
    first.start()
    try:
        with pytest.raises(ControlError) as caught:
            ControlServer({}, run_dir / "livecam.sock").start()
    finally:
        first.stop()
    assert str(caught.value) == (f"livecam is already running (it holds {run_dir / 'livecam.lock'}"
                                 "); stop it with `livecam stop`")  # fmt: skip


def test_a_lock_the_filesystem_refuses_is_one_line(run_dir, monkeypatch) -> None:
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(control.fcntl, "flock", refuse)
    with pytest.raises(ControlError) as caught:
        ControlServer({}, run_dir / "livecam.sock").start()
    lock = run_dir / "livecam.lock"
    assert str(caught.value) == f"cannot lock {lock}: {os.strerror(errno.ENOLCK)}"


def test_a_lock_that_cannot_be_opened_is_one_line(run_dir) -> None:
    (run_dir / "target").write_text("")
    (run_dir / control.LOCK_NAME).symlink_to(run_dir / "target")  # O_NOFOLLOW refuses it
    with pytest.raises(ControlError, match=r"cannot create the control socket .*livecam\.lock"):
        ControlServer({}, run_dir / "livecam.sock").start()


def test_the_client_s_errors_name_the_daemon(run_dir) -> None:
    path = run_dir / "livecam.sock"
    not_running = (f"livecam is not running (no daemon at {path}); "
                   "start it with `livecam start`")  # fmt: skip
    with pytest.raises(ControlError) as caught:
        request({"cmd": "status"}, path)  # no socket
    assert str(caught.value) == not_running
    missing = run_dir / "gone" / "livecam.sock"
    with pytest.raises(ControlError) as caught:
        request({"cmd": "status"}, missing)  # no runtime directory at all
    assert str(caught.value) == not_running.replace(str(path), str(missing))
    assert not missing.parent.exists()  # asking never creates the daemon's directory
    deep = run_dir / ("d" * 120)  # a path no Unix socket can have
    deep.mkdir(mode=0o700)
    with pytest.raises(ControlError, match=f"^cannot talk to livecam at {deep}/livecam.sock: "):
        request({"cmd": "status"}, deep / "livecam.sock")


def _one_answer(path: Path, answer: bytes, seen: list[bytes]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.makefile("rb").readline())
                with contextlib.suppress(BrokenPipeError):  # a client may read only part
                    conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b'{"ok": 1}\n', {"ok": 1}),
        (b"[1, 2]\n", "livecam at {path} gave no valid answer: b'[1, 2]\\n'"),
        (b"x" * 200 + b"\n", "livecam at {path} gave no valid answer: b'" + "x" * 80 + "'"),
        (b'{"error": "no such avatar"}\n', "no such avatar"),
    ],
)
def test_the_client_sends_one_line_and_checks_the_answer(run_dir, answer, expected) -> None:
    path, seen = run_dir / "livecam.sock", []
    thread = _one_answer(path, answer, seen)
    try:
        if isinstance(expected, dict):
            assert request({"cmd": "status"}, path) == expected
        else:
            with pytest.raises(ControlError) as caught:
                request({"cmd": "status"}, path)
            assert str(caught.value) == expected.format(path=path)
    finally:
        thread.join(10)
    assert seen == [b'{"cmd": "status"}\n']


def test_the_client_waits_for_a_full_backlog_until_its_deadline(monkeypatch) -> None:
    class Full:
        def __init__(self, busy: int) -> None:
            self.busy = busy

        def connect(self, address: str) -> None:
            if self.busy:
                self.busy -= 1
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    conn = Full(busy=3)
    control._connect(conn, Path("/x"), time.monotonic() + 60)  # type: ignore[arg-type]
    assert conn.busy == 0  # it retried until the daemon took it
    with pytest.raises(TimeoutError) as caught:
        control._connect(Full(busy=10**6), Path("/x"), time.monotonic())  # type: ignore[arg-type]
    assert str(caught.value) == "the daemon's connection queue stayed full"


def test_a_request_waits_while_the_daemon_s_backlog_is_full(run_dir) -> None:
    path = run_dir / "livecam.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    while True:  # fill the backlog: one more connect would fail with EAGAIN
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            conn.connect(str(path))
        except BlockingIOError:
            conn.close()
            break
        queued.append(conn)
    asking = threading.Event()

    def serve() -> None:  # the daemon catches up once the request is waiting
        asking.wait(30)
        time.sleep(0.2)
        for conn in queued:  # those clients give up: their connections read as empty
            conn.close()
        with contextlib.suppress(OSError):  # the listener shut down: the request never came
            for _ in range(len(queued) + 1):
                conn, _ = listener.accept()
                with conn:
                    if conn.recv(100):
                        conn.sendall(b'{"ok": true}\n')
                        return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        asking.set()
        assert request({"cmd": "status"}, path, timeout=30) == {"ok": True}
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting for it
        thread.join(10)
        listener.close()


def test_a_daemon_that_never_answers_is_given_up(run_dir) -> None:
    path = run_dir / "livecam.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)  # connections queue; nobody reads or answers them
        # a client that ignored its timeout would wait for ever: after 10 s its connection is
        # reset instead (closing the listener drops the queued connections)
        reset = threading.Timer(10, listener.close)
        reset.start()
        try:
            with pytest.raises(ControlError, match=f"^cannot talk to livecam at {path}: timed out"):
                request({"cmd": "status"}, path, timeout=0.3)
        finally:
            reset.cancel()


def test_an_answer_is_read_up_to_one_mebibyte(run_dir) -> None:
    path, seen = run_dir / "livecam.sock", []
    huge = json.dumps({"pad": "x" * (3 << 19)}).encode() + b"\n"  # 1.5 MiB: cut, so not JSON
    thread = _one_answer(path, huge, seen)
    try:
        with pytest.raises(ControlError, match="gave no valid answer"):
            request({"cmd": "status"}, path)
    finally:
        thread.join(10)


def test_a_request_line_is_read_up_to_its_newline() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b'{"cmd": "status"}\n{"cmd": "stop"}\n')
        assert control._read_line(a, time.monotonic() + 60) == b'{"cmd": "status"}'
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b'{"cmd": "status"}')
        b.shutdown(socket.SHUT_WR)  # no newline: the end of the stream ends the line
        # well before its deadline (2 s for a request) a line that is there is read
        assert control._read_line(a, time.monotonic() + 0.9) == b'{"cmd": "status"}'
    # packets keep their boundaries: each recv() gets one piece, as a slow client sends them
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        for piece in (b'{"cmd": "st', b"at", b'us"}\n'):
            b.sendall(piece)
        assert control._read_line(a, time.monotonic() + 60) == b'{"cmd": "status"}'
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.sendall(b"x" * (control.MAX_REQUEST - 100))
        b.sendall(b"y" * 200)  # only what fits under the cap is asked for
        line = control._read_line(a, time.monotonic() + 60)
        assert line == b"x" * (control.MAX_REQUEST - 100) + b"y" * 100
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"y" * (2 * control.MAX_REQUEST))
        assert control._read_line(a, time.monotonic() + 60) == b"y" * control.MAX_REQUEST
    a, b = socket.socketpair()
    with a, b:
        assert control._read_line(a, time.monotonic()) is None  # its time is up: no line
        lines: list[bytes | None] = []
        reader = threading.Thread(
            target=lambda: lines.append(control._read_line(a, time.monotonic() + 0.3))
        )
        reader.start()
        reader.join(10)  # a silent client is given up at the deadline, not waited for
        b.close()
        reader.join(30)
        assert lines == [None]
        assert control._read_line(a, time.monotonic() + 60) == b""


def test_bad_requests_list_the_commands(run_dir) -> None:
    server = ControlServer({"stop": dict, "status": dict}, run_dir / "livecam.sock")
    for line in (b"", b"not json", b"[]", b'{"cmd": 1}', b'{"cmd": "nope"}', b'{"no": "cmd"}'):
        assert server._answer(line) == {"error": "bad request; commands: status, stop"}


def test_a_handler_s_error_is_the_answer(run_dir, caplog) -> None:
    def refuse(_: dict) -> dict:
        raise ControlError("no such avatar: x")

    def crash(_: dict) -> dict:
        raise KeyError("frame")

    server = ControlServer({"avatar": refuse, "status": crash}, run_dir / "livecam.sock")
    assert server._answer(b'{"cmd": "avatar"}') == {"error": "no such avatar: x"}
    assert not caplog.records  # a user's mistake is not logged as a failure
    assert server._answer(b'{"cmd": "status"}') == {"error": "status failed: 'frame'"}
    assert caplog.records[-1].getMessage() == "control request 'status' failed"


def test_failing_accepts_are_logged_sparingly_and_retried(run_dir, monkeypatch, caplog) -> None:
    """accept() failing with EMFILE again and again: one warning, then every 50th; a
    connection accepted in between starts the count again."""
    monkeypatch.setattr(control, "ACCEPT_BACKOFF_S", 0.0)
    server = ControlServer({"status": lambda _: {"ok": True}}, run_dir / "livecam.sock")
    client, served = socket.socketpair()
    emfile = OSError(errno.EMFILE, "Too many open files")
    script = [*[emfile] * 50, (served, None), emfile]

    class Flaky:
        calls = 0

        def accept(self):
            if self.calls == len(script):  # as stop() makes it
                server._stopping.set()
                raise OSError(errno.EINVAL, "Invalid argument")
            step = script[self.calls]
            self.calls += 1
            if isinstance(step, OSError):
                raise step
            return step

    server._sock = Flaky()  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger=control.__name__)
    with client:
        client.settimeout(10)  # an answer that never comes fails the test
        client.sendall(b'{"cmd": "status"}\n')
        server._serve()  # returns once stopping
        assert json.loads(client.makefile("rb").readline()) == {"ok": True}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # failures 1 and 50 of the first run, then the first of the next
    assert warnings == ["control socket: accept failed ([Errno 24] Too many open files); "
                        "retrying"] * 3  # fmt: skip


def test_an_accept_error_while_stopping_ends_the_server(run_dir) -> None:
    server = ControlServer({}, run_dir / "livecam.sock")

    class Closed:
        def accept(self):
            server._stopping.set()
            raise OSError(errno.EBADF, "Bad file descriptor")

    server._sock = Closed()  # type: ignore[assignment]
    server._serve()  # returns instead of retrying


def test_the_status_answer_has_the_ratios() -> None:
    fields = {f: 0 for f in Snapshot.__dataclass_fields__}
    fields.update(avatar="a", engine="lite", tier="full", sink="memory", source="mic")
    fields.update(stages_ms={}, warnings=(), frames_shown=10, frames_held=2, frames_repeated=3)
    data = control.snapshot_dict(Snapshot(**fields))
    assert data["repeat_ratio"] == pytest.approx(0.3)
    assert data["skip_ratio"] == pytest.approx(0.5)
    assert data["frames_shown"] == 10 and data["avatar"] == "a"


class _Once:
    """A listening socket stand-in: accept() hands out `conn` once, then the server stops."""

    def __init__(self, server: ControlServer, conn: socket.socket) -> None:
        self.server, self.conn = server, conn

    def accept(self):
        conn, self.conn = self.conn, None
        if conn is None:
            self.server._stopping.set()
            raise TimeoutError
        return conn, None


def test_a_connection_beyond_the_limit_is_told_to_retry(run_dir, monkeypatch) -> None:
    monkeypatch.setattr(control, "SLOT_WAIT_S", 0.01)
    server = ControlServer({"status": lambda _: {"ok": True}}, run_dir / "livecam.sock")
    for _ in range(control.MAX_CLIENTS):
        server._slots.acquire()  # every slot taken
    client, served = socket.socketpair()
    with client:
        server._sock = _Once(server, served)  # type: ignore[assignment]
        server._serve()
        answer = json.loads(client.makefile("rb").readline())
    assert answer == {"error": "livecam is busy with other control requests; retry"}


def test_a_client_gone_before_its_answer_does_not_end_the_server(run_dir, monkeypatch) -> None:
    monkeypatch.setattr(control, "SLOT_WAIT_S", 0.01)
    server = ControlServer({}, run_dir / "livecam.sock")
    for _ in range(control.MAX_CLIENTS):
        server._slots.acquire()
    client, served = socket.socketpair()
    client.close()  # the "busy" answer finds nobody
    server._sock = _Once(server, served)  # type: ignore[assignment]
    server._serve()  # returns normally once stopping


def test_the_server_s_threads_never_keep_the_daemon_alive(run_dir) -> None:
    served_by: list[threading.Thread] = []

    def status(_: dict) -> dict:
        served_by.append(threading.current_thread())
        return {"ok": True}

    server = ControlServer({"status": status}, run_dir / "livecam.sock")
    server.start()
    try:
        assert request({"cmd": "status"}, server.path) == {"ok": True}
    finally:
        server.stop()
    assert server._thread.name == "control" and server._thread.daemon
    assert served_by[0] is not server._thread and served_by[0].daemon  # one per connection


def test_a_connection_no_thread_can_serve_is_told_to_retry(run_dir, monkeypatch) -> None:
    class NoThreads:
        def __init__(self, **kwargs) -> None:
            pass

        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    server = ControlServer({"status": lambda _: {"ok": True}}, run_dir / "livecam.sock")
    client, served = socket.socketpair()
    with client:
        client.settimeout(10)
        server._sock = _Once(server, served)  # type: ignore[assignment]
        monkeypatch.setattr(control.threading, "Thread", NoThreads)
        server._serve()
        answer = json.loads(client.makefile("rb").readline())
    assert answer == {"error": "livecam cannot take this request now; retry"}
    for _ in range(control.MAX_CLIENTS):  # its slot was given back
        assert server._slots.acquire(timeout=0)


def test_a_connection_that_fails_is_logged_and_frees_its_slot(run_dir, caplog) -> None:
    server = ControlServer({}, run_dir / "livecam.sock")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.close()  # unusable: every call on it raises
    server._slots.acquire()  # as _serve does before handing it over
    server._serve_one(conn)
    assert caplog.records[-1].getMessage() == "control connection failed"
    for _ in range(control.MAX_CLIENTS):  # the slot was given back
        assert server._slots.acquire(timeout=0)


def _slow_server(run_dir: Path, n: int):
    """A server whose `slow` requests each wait for their own release."""
    entered = [threading.Event() for _ in range(n)]
    release = [threading.Event() for _ in range(n)]

    def slow(message: dict) -> dict:
        entered[message["n"]].set()
        release[message["n"]].wait(10)
        return {"ok": message["n"]}

    server = ControlServer({"slow": slow}, run_dir / "livecam.sock")
    server.start()
    answers: list[dict] = []
    clients = [threading.Thread(target=lambda k=k: answers.append(request(
        {"cmd": "slow", "n": k}, server.path, timeout=15))) for k in range(n)]  # fmt: skip
    for client, came in zip(clients, entered, strict=True):
        client.start()
        assert came.wait(10)
    return server, release, clients, answers


def test_stop_waits_for_the_answers_in_progress(run_dir) -> None:
    """`livecam stop` is answered by the daemon it stops: answers go out before the server (and
    the process) is gone."""
    server, release, clients, answers = _slow_server(run_dir, 2)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    release[0].set()
    clients[0].join(10)
    assert answers == [{"ok": 0}]
    stopper.join(0.2)
    assert stopper.is_alive()  # the second answer is still being made
    release[1].set()
    stopper.join(10)
    clients[1].join(10)
    assert answers == [{"ok": 0}, {"ok": 1}] and not stopper.is_alive()


def test_stop_waits_for_a_stuck_handler_no_longer_than_the_request_deadline(
    run_dir, monkeypatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_DEADLINE_S", 0.1)
    server, release, clients, _ = _slow_server(run_dir, 1)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()  # while the handler still waits
    release[0].set()
    clients[0].join(10)


def test_stop_with_no_answer_in_progress_does_not_wait(run_dir, monkeypatch) -> None:
    """Every answer given, stop() returns at once: it waits out the request deadline only for
    answers still being made."""
    monkeypatch.setattr(control, "REQUEST_DEADLINE_S", 60.0)
    server = ControlServer({"ping": lambda message: {"pong": True}}, run_dir / "livecam.sock")
    server.start()
    assert [request({"cmd": "ping"}, server.path) for _ in range(3)] == [{"pong": True}] * 3
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
