"""The control socket: a running `livecam start` answers small JSON requests.

One request per connection, one JSON object per line each way, on a Unix socket in
$XDG_RUNTIME_DIR that only the user can open (mode 0600 in a directory checked to be the
user's own, mode 0700). No TCP port is opened.
Requests: {"cmd": "status"}, {"cmd": "stop"}, {"cmd": "mute", "on": true|false},
{"cmd": "avatar", "name": NAME} (switch the avatar without closing the camera).

Single instance: the daemon holds an flock on livecam.lock next to the socket for as long as
it runs. The lock, never a timed-out request, decides whether a daemon is alive, so a busy
daemon is never taken for a crashed one, and only the lock holder removes the socket.
Each connection is served by its own thread (at most MAX_CLIENTS at once) under a deadline,
so no client can stall another or the daemon. A handler's ControlError becomes
{"error": message}; no request can stop the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_CLIENTS = 32  # connections served at once; more wait (briefly) in the backlog
BACKLOG = 128
REQUEST_DEADLINE_S = 2.0  # to send the whole request line, and again to read the answer
SLOT_WAIT_S = 1.0  # a connection waits this long for a free slot, then is told "busy"
ACCEPT_BACKOFF_S = 0.2  # after an accept error such as EMFILE
SOCKET_NAME, LOCK_NAME = "livecam.sock", "livecam.lock"
MAX_SOCKET_PATH = 108  # sun_path, including its terminating NUL (Linux)


class ControlError(Exception):
    """Talking to the daemon failed, with a message fit for the user."""


def runtime_dir() -> Path:
    return Path(
        os.environ.get("LIVECAM_RUNTIME_DIR")
        or os.environ.get("XDG_RUNTIME_DIR")
        or f"/tmp/livecam-{os.getuid()}"
    )


def socket_path() -> Path:
    return runtime_dir() / SOCKET_NAME


def check_runtime_dir(path: Path, *, create: bool) -> bool:
    """True when `path` is a usable private directory (created 0700 if `create`), False when
    it does not exist; ControlError if it is a symlink, not ours, or open to others."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create the runtime directory {path}: {exc.strerror}; "
                               "set LIVECAM_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a private, "
                               "writable directory") from None  # fmt: skip
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ControlError(f"cannot use the runtime directory {path}: {exc.strerror}") from None
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not you (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700"
    if problem:
        raise ControlError(
            f"refusing the runtime directory {path}: it {problem}. Remove it, or set "
            "XDG_RUNTIME_DIR (or LIVECAM_RUNTIME_DIR) to a private directory"
        )
    return True


def request(message: dict[str, Any], path: Path | None = None, timeout: float = 5.0) -> dict:
    """Send one request to the running daemon and return its answer."""
    path = path or socket_path()
    if not check_runtime_dir(path.parent, create=False):
        raise ControlError(f"livecam is not running (no daemon at {path}); "
                           "start it with `livecam start`")  # fmt: skip
    try:
        with socket.socket(socket.AF_UNIX) as conn:  # a stream socket
            conn.settimeout(timeout)
            _connect(conn, path, time.monotonic() + timeout)
            conn.sendall(json.dumps(message).encode() + b"\n")
            data = conn.makefile("rb").readline(1 << 20)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"livecam is not running (no daemon at {path}); "
                           "start it with `livecam start`") from None  # fmt: skip
    except OSError as exc:
        raise ControlError(f"cannot talk to livecam at {path}: {exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"livecam at {path} gave no valid answer: {data[:80]!r}")
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer


class ControlServer:
    """Serves requests from threads; `handlers` map a command to a function of the request.
    Handlers may run concurrently (one thread per connection)."""

    def __init__(self, handlers: dict[str, Callable[[dict], dict]], path: Path | None = None):
        self.handlers = handlers
        self.path = path or socket_path()
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None  # (dev, ino) of the socket we bound
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._answering = 0  # requests read and not yet answered (under _answered)
        self._answered = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        check_runtime_dir(self.path.parent, create=True)
        self._lock_fd = _take_lock(self.path.with_name(LOCK_NAME))
        try:
            self.path.unlink(missing_ok=True)  # we hold the lock: any socket here is stale
            self._sock = self._bind()
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._thread.start()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)  # a stream socket
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(_unusable_runtime_dir(self.path, exc)) from None
        finally:
            os.umask(old_umask)
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(BACKLOG)  # accept() blocks until a client comes or stop() shuts it down
        return sock

    def _serve(self) -> None:
        failures = 0
        while not self._stopping.is_set() and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                failures += 1  # EMFILE, ENFILE, ENOBUFS...: the daemon stays reachable later
                if failures == 1 or failures % 50 == 0:
                    log.warning("control socket: accept failed (%s); retrying", exc)
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            failures = 0
            if not self._slots.acquire(timeout=SLOT_WAIT_S):
                _reply(conn, {"error": "livecam is busy with other control requests; retry"})
                continue
            try:
                threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread could be started
                self._slots.release()
                _reply(conn, {"error": "livecam cannot take this request now; retry"})

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                line = _read_line(conn, time.monotonic() + REQUEST_DEADLINE_S)
                if line is None:
                    return
                with self._answered:
                    self._answering += 1
                try:
                    if len(line) >= MAX_REQUEST:
                        _reply(conn, {"error": f"request longer than {MAX_REQUEST - 1} bytes"})
                    else:
                        _reply(conn, self._answer(line))
                finally:
                    with self._answered:
                        self._answering -= 1
                        self._answered.notify_all()
        except Exception:  # never let one connection take anything else down
            log.exception("control connection failed")
        finally:
            self._slots.release()

    def _answer(self, line: bytes) -> dict:
        try:
            message = json.loads(line)
            handler = self.handlers[message["cmd"]]
        except (ValueError, KeyError, TypeError):
            return {"error": f"bad request; commands: {', '.join(sorted(self.handlers))}"}
        try:
            return handler(message)
        except ControlError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a bug in a handler must not end the control thread
            log.exception("control request %r failed", message.get("cmd"))
            return {"error": f"{message.get('cmd')} failed: {exc}"}

    def stop(self) -> None:
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting in _serve
            sock.close()
            self._thread.join(timeout=2)
            self._remove_own_socket()
            with self._answered:  # `stop` itself is answered before the daemon exits
                self._answered.wait_for(lambda: not self._answering, REQUEST_DEADLINE_S)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _remove_own_socket(self) -> None:
        """Unlink the socket only if it still is the one this server bound."""
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()


def _take_lock(path: Path) -> int:
    """Open and flock `path`; ControlError if another daemon holds it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ControlError(_unusable_runtime_dir(path, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ControlError(f"livecam is already running (it holds {path}); "
                               "stop it with `livecam stop`") from None  # fmt: skip
        raise ControlError(f"cannot lock {path}: {exc.strerror}") from None
    return fd


def _connect(conn: socket.socket, path: Path, deadline: float) -> None:
    """Connect, waiting while the daemon's backlog is full (EAGAIN) until `deadline`."""
    while True:
        try:
            return conn.connect(str(path))
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("the daemon's connection queue stayed full") from None
            time.sleep(0.02)


def _read_line(conn: socket.socket, deadline: float) -> bytes | None:
    """The request line before `deadline` (None if it does not come): at most MAX_REQUEST
    bytes with its newline; MAX_REQUEST bytes without one mean it is longer."""
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(MAX_REQUEST - len(data))
        except OSError:  # timed out or reset
            return None
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _reply(conn: socket.socket, answer: dict) -> None:
    with conn, contextlib.suppress(OSError):
        conn.settimeout(REQUEST_DEADLINE_S)
        conn.sendall(json.dumps(answer).encode() + b"\n")


def _unusable_runtime_dir(path: Path, exc: OSError) -> str:
    """One line naming the runtime directory that cannot hold the socket, and the fix."""
    if len(os.fsencode(path)) >= MAX_SOCKET_PATH:
        why = f"the path is longer than the {MAX_SOCKET_PATH - 1} bytes a Unix socket allows"
    elif exc.errno == errno.EROFS:
        why = "it is on a read-only filesystem"
    elif exc.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.EPERM):
        why = "its filesystem does not support Unix sockets (9p, FUSE and some network mounts)"
    else:
        why = exc.strerror or str(exc)
    return (f"cannot create the control socket {path}: {why}; point LIVECAM_RUNTIME_DIR (or "
            "XDG_RUNTIME_DIR) at a short, writable directory on a local filesystem or tmpfs, "
            "e.g. `export LIVECAM_RUNTIME_DIR=/dev/shm/livecam-$UID`")  # fmt: skip


def snapshot_dict(snapshot: Any) -> dict:
    data = dataclasses.asdict(snapshot)
    data["repeat_ratio"], data["skip_ratio"] = snapshot.repeat_ratio, snapshot.skip_ratio
    return data
