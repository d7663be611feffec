"""Browser preview sink: MJPEG over HTTP on localhost.

Only requests whose Host header names this machine (127.0.0.1, localhost, [::1] or the host
it listens on) are served, so a web page cannot reach the camera through DNS rebinding.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from livecam.sinks.base import SinkError, check_frame

log = logging.getLogger(__name__)

JPEG_QUALITY = 80
BOUNDARY = "livecamframe"
CLIENT_TIMEOUT_S = 10.0  # a client that accepts no data for this long is dropped
ACCEPT_BACKOFF_S = 0.2  # after an accept error such as EMFILE (else the loop spins)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>livecam</title>
<style>html,body{margin:0;height:100%;background:#111}
img{display:block;width:100%;height:100%;object-fit:contain}</style></head>
<body><img src="/stream.mjpg" alt="livecam"></body></html>
"""


class _FrameStore:
    """Latest frame plus a lazily encoded JPEG of it, at most one encode per frame."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._seq = 0
        self._closed = False
        self._jpeg_lock = threading.Lock()
        self._jpeg: tuple[int, bytes] = (0, b"")
        self.encodes = 0  # JPEG encodes done (for tests and stats)

    def put(self, frame: np.ndarray) -> None:
        copy = frame.copy()  # the caller may reuse its buffer
        with self._cond:
            self._frame = copy
            self._seq += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def jpeg_after(self, seq: int, timeout: float) -> tuple[int, bytes] | None:
        """Wait for a frame newer than `seq`; return (its number, JPEG) or None."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._seq > seq, timeout)
            if self._closed or self._seq <= seq or self._frame is None:
                return None
            seq, frame = self._seq, self._frame
        with self._jpeg_lock:
            if self._jpeg[0] < seq:
                ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise RuntimeError("JPEG encoding failed")
                self._jpeg = (seq, buf.tobytes())
                self.encodes += 1
            return self._jpeg


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # never keeps the process alive; close() joins them itself

    def __init__(self, address: tuple[str, int], store: _FrameStore) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.allowed_hosts = LOCAL_HOSTS | {address[0].lower()}
        self.accept_failures = 0
        self.clients: dict[socket.socket, threading.Thread] = {}
        self.clients_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        try:
            request = super().get_request()
        except OSError as exc:  # the caller drops the attempt; pause so it does not spin
            self.accept_failures += 1
            if self.accept_failures == 1 or self.accept_failures % 50 == 0:
                log.warning("preview: accept failed (%s); retrying", exc)
            time.sleep(ACCEPT_BACKOFF_S)
            raise
        self.accept_failures = 0
        return request

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away is one debug line; anything else is logged in full."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("preview client %s went away: %s", client_address, exc)
        else:
            log.exception("preview request from %s failed", client_address)

    def disconnect_all(self, timeout: float = 2.0) -> None:
        """Shut down every client connection and join the threads serving them."""
        with self.clients_lock:
            clients = list(self.clients.items())
        for conn, _ in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join(timeout)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        with self.server.clients_lock:
            self.server.clients[self.connection] = threading.current_thread()

    def finish(self) -> None:
        with self.server.clients_lock:
            self.server.clients.pop(self.connection, None)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        if not self._host_allowed():
            self._reply(403, "text/plain", b"forbidden host\n")
            return
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._reply(200, "text/html; charset=utf-8", PAGE)
        elif path == "/frame.jpg":
            got = self.server.store.jpeg_after(0, timeout=2.0)
            if got is None:
                self._reply(503, "text/plain", b"no frame yet\n")
            else:
                self._reply(200, "image/jpeg", got[1])
        elif path == "/stream.mjpg":
            self._stream()
        else:
            self._reply(404, "text/plain", b"not found\n")

    def _host_allowed(self) -> bool:
        """The Host header (without its port) names this machine, or is absent."""
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser, so not a rebinding attack
        host = host.strip().lower()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in self.server.allowed_hosts

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        store, seq = self.server.store, 0
        with contextlib.suppress(OSError):  # the client went away or close() cut it off
            while not store.closed:
                got = store.jpeg_after(seq, timeout=1.0)
                if got is None:
                    continue
                seq, jpeg = got
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                head += f"Content-Length: {len(jpeg)}\r\n\r\n"
                self.wfile.write(head.encode() + jpeg + b"\r\n")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("preview %s: " + format, self.address_string(), *args)


class PortInUse(SinkError):
    """Another program listens on the preview's port."""


class PreviewSink:
    """Serves the latest frame as MJPEG at `url`; `send` only stores a copy."""

    def __init__(
        self, width: int, height: int, fps: float, host: str = "127.0.0.1", port: int = 8080
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._store = _FrameStore()
        try:
            self._server = _Server((host, port), self._store)
        except OSError as e:
            error = PortInUse if e.errno == errno.EADDRINUSE else SinkError
            raise error(_bind_error(e, host, port)) from e
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="preview-http",
            daemon=True,
        )
        self._thread.start()
        self._closed = False
        self.name = f"browser preview {self.url}"
        self.latency_s = 1.0 / fps  # about one frame for encoding and transfer

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def jpeg_encodes(self) -> int:
        return self._store.encodes

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        self._store.put(frame)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store.close()
        self._server.shutdown()  # stops accepting
        self._server.server_close()
        self._server.disconnect_all()
        self._thread.join()


def _bind_error(e: OSError, host: str, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use; "
            f"pick another one with --port (e.g. --port {port + 1})"
        )
    if e.errno == errno.EACCES:
        return f"no permission to listen on port {port}; use a port above 1023 with --port"
    return f"cannot serve the preview on {host}:{port}: {e.strerror or e}"
