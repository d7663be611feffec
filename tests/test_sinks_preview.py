"""Browser preview sink: real HTTP on a free localhost port."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from livecam.sinks import SinkError
from livecam.sinks.preview import BOUNDARY, PreviewSink

W, H, FPS = 160, 120, 30
NO_AUDIO = np.zeros(0, np.float32)
BGR = (200, 60, 20)


@pytest.fixture
def sink() -> Iterator[PreviewSink]:
    s = PreviewSink(W, H, FPS, port=0)
    yield s
    s.close()


def solid(color: tuple[int, int, int] = BGR) -> np.ndarray:
    return np.full((H, W, 3), color, np.uint8)


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["Content-Type"], r.read()


def test_page_and_single_frame(sink: PreviewSink) -> None:
    assert sink.url.startswith("http://127.0.0.1:") and sink.port != 0
    ctype, page = get(sink.url)
    assert ctype.startswith("text/html") and b"<img" in page and b"livecam" in page
    sink.send(solid(), NO_AUDIO)
    ctype, body = get(sink.url + "frame.jpg")
    assert ctype == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3)
    assert np.abs(img.reshape(-1, 3).mean(0) - BGR).max() < 8


def test_jpeg_encoded_lazily_once_per_frame(sink: PreviewSink) -> None:
    for _ in range(5):
        sink.send(solid(), NO_AUDIO)
    assert sink.jpeg_encodes == 0  # nobody asked yet
    get(sink.url + "frame.jpg")
    get(sink.url + "frame.jpg")
    assert sink.jpeg_encodes == 1


def read_part(conn: socket.socket) -> bytes:
    """Read the HTTP head and the first multipart JPEG from a raw socket."""
    f = conn.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    assert b"multipart/x-mixed-replace; boundary=" + BOUNDARY.encode() in head
    assert f.readline().strip() == b"--" + BOUNDARY.encode()
    headers = {}
    while (line := f.readline().strip()) != b"":
        key, value = line.split(b":", 1)
        headers[key.strip().lower()] = value.strip()
    assert headers[b"content-type"] == b"image/jpeg"
    return f.read(int(headers[b"content-length"]))


def open_stream(sink: PreviewSink) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    conn.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return conn


def test_stream_first_part(sink: PreviewSink) -> None:
    sink.send(solid((10, 240, 10)), NO_AUDIO)
    with open_stream(sink) as conn:
        jpeg = read_part(conn)
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3) and img[..., 1].mean() > 200


def test_close_disconnects_a_stalled_client() -> None:
    sink = PreviewSink(640, 480, FPS, port=0)
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    conn = open_stream(sink)  # never reads: the server's writes back up (~300 kB a frame)
    for _ in range(40):
        sink.send(noise, NO_AUDIO)  # must not block on the slow client
        time.sleep(0.01)
    closer = threading.Thread(target=sink.close)
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive(), "close() hung on a stalled client"
    assert not sink._server.clients, "a client thread outlived close()"
    assert conn.recv(65536)  # data queued before the cut is still readable
    conn.close()


def test_port_in_use(sink: PreviewSink) -> None:
    with pytest.raises(SinkError, match=rf"port {sink.port} .*already in use.*--port"):
        PreviewSink(W, H, FPS, port=sink.port)


def test_wrong_frame_size(sink: PreviewSink) -> None:
    with pytest.raises(ValueError, match=r"frame must be a \(120, 160, 3\)"):
        sink.send(np.zeros((H + 1, W, 3), np.uint8), NO_AUDIO)


def _raw_get(port: int, host: str | None, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host else "")
        conn.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_only_local_host_headers_are_served(sink: PreviewSink) -> None:
    sink.send(solid(), NO_AUDIO)
    for host in ("127.0.0.1", f"127.0.0.1:{sink.port}", f"localhost:{sink.port}", "LOCALHOST",
                 f"[::1]:{sink.port}", None):  # fmt: skip
        assert _raw_get(sink.port, host).startswith(b"HTTP/1.0 200"), host
    for host in (f"evil.example:{sink.port}", "evil.example", "127.0.0.1.evil.example",
                 "localhost.evil.example:80", "[::2]:80"):  # fmt: skip
        for path in ("/", "/frame.jpg", "/stream.mjpg"):
            assert _raw_get(sink.port, host, path).startswith(b"HTTP/1.0 403"), host


def test_a_client_that_went_away_is_one_debug_line(sink: PreviewSink, caplog, capsys) -> None:
    caplog.set_level("DEBUG", logger="livecam.sinks.preview")
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        sink._server.handle_error(None, ("127.0.0.1", 5555))
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("DEBUG", None)]
    assert "went away" in caplog.records[0].getMessage()
    assert capsys.readouterr().err == ""  # socketserver's default printed a traceback here


def test_accept_errors_do_not_spin(sink: PreviewSink, monkeypatch) -> None:
    import errno
    import socketserver

    calls = []

    def exhausted(self):
        calls.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socketserver.TCPServer, "get_request", exhausted)
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5):  # always readable
        time.sleep(1.0)
        spins = len(calls)
    monkeypatch.undo()
    assert 1 <= spins <= 10  # with no pause: thousands of accept attempts a second
    assert get(sink.url)[0].startswith("text/html")  # and it serves again afterwards


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset, as a browser tab that is killed does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_real_disconnects_log_no_traceback(sink: PreviewSink, caplog, capsys) -> None:
    caplog.set_level("DEBUG")
    noise = np.random.default_rng(1).integers(0, 256, (H, W, 3), np.uint8)
    sink.send(noise, NO_AUDIO)
    for _ in range(3):
        conn = open_stream(sink)
        read_part(conn)
        _reset(conn)  # mid-stream: the next frame's write fails
        for _ in range(5):
            sink.send(noise, NO_AUDIO)
            time.sleep(0.02)
    for path in ("/frame.jpg", "/"):  # gone before the answer is written
        conn = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        _reset(conn)
    time.sleep(0.5)
    assert get(sink.url)[0].startswith("text/html")  # still serving
    assert [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []
    assert "Traceback" not in capsys.readouterr().err


OUT_OF_DESCRIPTORS = textwrap.dedent("""
    import os, resource, sys
    from livecam.sinks.preview import PreviewSink
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    sink = PreviewSink(16, 16, 30, port=0)
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(sink.port, flush=True)
    sys.stdin.readline()  # the test's client now waits in the backlog: every accept fails
    failures = sink._server.accept_failures
    for fd in filler:
        os.close(fd)
    print(failures, flush=True)
    sys.stdin.readline()
    sink.close()
""")


def test_out_of_descriptors_the_preview_pauses_and_recovers() -> None:
    proc = subprocess.Popen([sys.executable, "-c", OUT_OF_DESCRIPTORS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            time.sleep(1.0)  # accept fails with EMFILE meanwhile
            proc.stdin.write("free\n")
            proc.stdin.flush()
            failures = int(proc.stdout.readline())
            assert 1 <= failures <= 25  # paused between attempts (a busy loop: thousands)
            assert conn.recv(100).startswith(b"HTTP/1.0 200")  # served once fds are back
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
