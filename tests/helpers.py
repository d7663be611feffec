"""Small helpers shared by tests: audio clips, the bundled photos and the eye distance, the
mouth-motion metric, mp4 probing, a systemd notify socket."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from livecam.constants import SAMPLE_RATE

AVATARS = Path(__file__).resolve().parents[1] / "avatars"
PHOTOS = {  # the bundled avatars' photos
    "portrait": AVATARS / "portrait" / "portrait.jpg",
    "astronaut": AVATARS / "astronaut" / "astronaut.png",
}


def eye_distance(points: np.ndarray) -> float:
    """Between the eyes' centres, of 68 landmarks: the unit landmark errors are given in."""
    return float(np.linalg.norm(points[36:42].mean(axis=0) - points[42:48].mean(axis=0)))


class TouchingPickle:
    """A pickle payload that creates `marker` when unpickled: proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_clip(path: Path, audio: np.ndarray) -> Path:
    sf.write(str(path), audio, SAMPLE_RATE)
    return path


def probe(path: Path) -> dict:
    """ffprobe's view of a media file: streams and format."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(out.stdout)


def read_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def start_recording(source: str, env: dict | None = None) -> subprocess.Popen:
    """`parec` recording a PulseAudio/PipeWire source as 16 kHz mono float32; stop it with
    `recorded`."""
    return subprocess.Popen(
        ["parec", f"--device={source}", "--raw", "--format=float32le", "--channels=1",
         f"--rate={SAMPLE_RATE}", "--latency-msec=20"], env=env, stdout=subprocess.PIPE,
    )  # fmt: skip


def recorded(recorder: subprocess.Popen) -> np.ndarray:
    """What a `start_recording` recorder heard, once stopped."""
    recorder.terminate()
    return np.frombuffer(recorder.communicate(timeout=30)[0], np.float32)


def loudest_rms(audio: np.ndarray, window: int = SAMPLE_RATE // 2) -> float:
    """The RMS of the loudest of the audio's `window`-sample stretches (0.0 for no audio)."""
    stretches = (audio[i : i + window] for i in range(0, len(audio), window))
    return max((float(np.sqrt(np.mean(s**2))) for s in stretches), default=0.0)


def loudness_per_frame(audio: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """RMS of the audio under each video frame."""
    out = np.zeros(n_frames)
    for k in range(n_frames):
        a, b = round(k * SAMPLE_RATE / fps), round((k + 1) * SAMPLE_RATE / fps)
        chunk = audio[a:b]
        out[k] = np.sqrt(np.mean(chunk**2)) if len(chunk) else 0.0
    return out


def mouth_box_on_canvas(avatar, compositor, pad: float = 0.3) -> tuple[slice, slice]:
    """The avatar's lip box mapped into the camera frame, padded for the jaw drop."""
    x, y, w, h = avatar.mouth_box()
    corners = np.array(
        [[x - pad * w, y - pad * h, 1], [x + w * (1 + pad), y + h * (1 + 3 * pad), 1]]
    )
    (x0, y0), (x1, y1) = (corners @ compositor.transform(0).T).astype(int)
    return slice(y0, y1), slice(x0, x1)


MEMORY_LIMIT = 2 << 30  # address space for a limited run: livecam with torch imported fits


def run_limited(
    args: list[str], limit: int = MEMORY_LIMIT, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a command with its address space capped: a run-away allocation fails (MemoryError,
    a non-zero exit) instead of taking the machine's memory."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=cap, env=os.environ.copy())  # fmt: skip


class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET; records (time, message)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def with_field(self, field: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if field in m.splitlines()]


def daemon_status(env: dict | None = None) -> dict | None:
    """`livecam status --json` of the daemon that `env` points to; None while none answers."""
    result = subprocess.run([sys.executable, "-m", "livecam", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    return json.loads(result.stdout) if result.returncode == 0 else None


def status_until(
    env: dict | None, daemon: subprocess.Popen, wanted, what: str, timeout_s: float = 60
) -> dict:
    """The daemon's first status for which `wanted(status)` holds; fails with `what` (and the
    last status) after timeout_s, or at once where the daemon exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert daemon.poll() is None, daemon.communicate()[1]
        status = daemon_status(env)
        if status is not None and wanted(status):
            return status
        assert time.monotonic() < deadline, f"{what}; last status: {status}"
        time.sleep(0.3)
