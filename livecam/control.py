"""The control socket: a running `livecam start` answers small JSON requests.

One request per connection, one JSON object per line each way, on a Unix socket in
$XDG_RUNTIME_DIR that only the user can open (mode 0600). No TCP port is opened.
Requests: {"cmd": "status"}, {"cmd": "stop"}, {"cmd": "mute", "on": true|false},
{"cmd": "avatar", "name": NAME} (switch the avatar without closing the camera).
A handler's ControlError becomes {"error": message}; no request can stop the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_SOCKET_PATH = 108  # sun_path, including its terminating NUL (Linux)


class ControlError(Exception):
    """Talking to the daemon failed, with a message fit for the user."""


def socket_path() -> Path:
    runtime = (
        os.environ.get("LIVECAM_RUNTIME_DIR")
        or os.environ.get("XDG_RUNTIME_DIR")
        or f"/tmp/livecam-{os.getuid()}"
    )
    return Path(runtime) / "livecam.sock"


def request(message: dict[str, Any], path: Path | None = None, timeout: float = 5.0) -> dict:
    """Send one request to the running daemon and return its answer."""
    path = path or socket_path()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(json.dumps(message).encode() + b"\n")
            data = conn.makefile("rb").readline(1 << 20)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"livecam is not running (no daemon at {path}); "
                           "start it with `livecam start`") from None  # fmt: skip
    except OSError as exc:
        raise ControlError(f"cannot talk to livecam at {path}: {exc}") from None
    answer = json.loads(data or b"{}")
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


class ControlServer:
    """Serves requests from a thread; `handlers` map a command to a function of the request."""

    def __init__(self, handlers: dict[str, Callable[[dict], dict]], path: Path | None = None):
        self.handlers = handlers
        self.path = path or socket_path()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(_unusable_runtime_dir(self.path, exc)) from None
        if self.path.exists():
            try:
                request({"cmd": "status"}, self.path, timeout=1.0)
            except (ControlError, ValueError):
                self.path.unlink(missing_ok=True)  # left by a crashed run
            else:
                raise ControlError(f"livecam is already running (control socket {self.path}); "
                                   "stop it with `livecam stop`")  # fmt: skip
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(_unusable_runtime_dir(self.path, exc)) from None
        finally:
            os.umask(old_umask)
        sock.listen(4)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread.start()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    reply = self._answer(conn.makefile("rb").readline(MAX_REQUEST))
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError as exc:
                    log.debug("control connection failed: %s", exc)

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
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._thread.join(timeout=2)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


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
