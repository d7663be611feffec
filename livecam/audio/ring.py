"""A fixed-size ring buffer of mono float32 audio, indexed by absolute sample number."""

from __future__ import annotations

import threading

import numpy as np


class AudioRing:
    """Holds the newest `capacity` samples of a stream.

    Sample n of the stream (counted from the start of capture) lives at slot n % capacity.
    One writer (the audio callback) appends; any thread reads a span by absolute index.
    Reading a span that was already overwritten raises, so callers notice they fell behind.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._end = 0  # absolute index one past the newest sample
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        """Absolute index one past the newest sample."""
        return self._end

    @property
    def start(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self._end - self.capacity)

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples) > self.capacity:  # only the newest part can be kept
            skipped = len(samples) - self.capacity
            samples = samples[skipped:]
        else:
            skipped = 0
        with self._lock:
            pos = (self._end + skipped) % self.capacity
            first = min(len(samples), self.capacity - pos)
            self._buf[pos : pos + first] = samples[:first]
            self._buf[: len(samples) - first] = samples[first:]
            self._end += skipped + len(samples)

    def write_silence(self, count: int) -> None:
        """Append `count` zero samples (a gap in capture) without allocating them."""
        with self._lock:
            kept = min(count, self.capacity)
            pos = (self._end + count - kept) % self.capacity
            first = min(kept, self.capacity - pos)
            self._buf[pos : pos + first] = 0
            self._buf[: kept - first] = 0
            self._end += count

    def read(self, start: int, stop: int) -> np.ndarray:
        """Copy of samples [start, stop); indices before 0 read as silence."""
        if stop < start:
            raise ValueError(f"empty span [{start}, {stop})")
        with self._lock:
            if stop > self._end:
                raise IndexError(f"samples up to {stop} requested, only {self._end} captured")
            if max(start, 0) < self.start:
                raise IndexError(
                    f"samples from {start} were overwritten (oldest held is {self.start})"
                )
            out = np.zeros(stop - start, dtype=np.float32)
            lo = max(start, 0)
            idx = np.arange(lo, stop) % self.capacity
            out[lo - start :] = self._buf[idx]
        return out
