"""In-memory sink for tests and benchmarks."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from livecam.sinks.base import SinkError, check_frame

MAX_TIMESTAMPS = 10_000


class MemorySink:
    """Counts frames and audio, records send times, keeps the last `keep` frames."""

    def __init__(self, width: int, height: int, fps: float, keep: int = 0) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.name = "memory"
        self.latency_s = 0.0
        self.frames_sent = 0
        self.audio_samples = 0
        self.times: deque[float] = deque(maxlen=MAX_TIMESTAMPS)  # time.monotonic() per send
        self.frames: deque[np.ndarray] = deque(maxlen=keep)
        self.closed = False

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        if self.closed:
            raise SinkError("the memory sink is closed")
        self.times.append(time.monotonic())
        self.frames_sent += 1
        self.audio_samples += int(audio.size)
        if self.frames.maxlen:
            self.frames.append(frame.copy())  # the caller may reuse its buffer

    def close(self) -> None:
        self.closed = True
