"""Run-time lite face: blend the nearest bank patches and paste them into the still.

Only the mouth and eye ROIs are touched per call; everything is precomputed in
float32 (patches premultiplied by their masks, the base times 1 - mask), so a call is
a handful of cv2 multiply-adds over two small ROIs. A video avatar's base changes per
frame: its mouth ROI term is recomputed (small), and its own eyes blink, so no eye patch.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from livecam.avatar.model import Avatar, PatchBank


def _grid_pos(value: float, lo: float, hi: float, n: int) -> tuple[int, float]:
    """Lower level index and fraction toward the next level on a uniform grid."""
    if n == 1:
        return 0, 0.0
    pos = (min(max(value, lo), hi) - lo) / (hi - lo) * (n - 1)
    i = min(int(pos), n - 2)
    return i, pos - i


class _BankPaster:
    def __init__(self, bank: PatchBank, base: np.ndarray) -> None:
        w, h = bank.size
        self.rows, self.cols = slice(bank.y, bank.y + h), slice(bank.x, bank.x + w)
        mask = bank.mask.astype(np.float32)
        self.premult = bank.patches.astype(np.float32) * mask  # (na, nb, h, w, 3)
        self.inverse = 1.0 - mask
        self.base_term = base[self.rows, self.cols].astype(np.float32) * self.inverse
        self.acc = np.empty_like(self.base_term)
        self.shape = bank.patches.shape[:2]

    def rebase(self, base: np.ndarray) -> None:
        np.multiply(base[self.rows, self.cols], self.inverse, out=self.base_term)

    def paste(self, out: np.ndarray, ia: int, ta: float, ib: int, tb: float) -> None:
        np.copyto(self.acc, self.base_term)
        for da, wa in ((0, 1.0 - ta), (1, ta)):
            for db, wb in ((0, 1.0 - tb), (1, tb)):
                wt = wa * wb
                if wt > 0.0:
                    cv2.scaleAdd(self.premult[ia + da, ib + db], wt, self.acc, dst=self.acc)
        # convertScaleAbs rounds and saturates to uint8 (values here are >= 0)
        out[self.rows, self.cols] = cv2.convertScaleAbs(self.acc)


class FaceRenderer:
    """Renders avatar frames for (openness, width, blink).

    render() returns a new array. It is thread-safe: the generator thread's spoken faces and the
    output thread's idle face share one renderer (and its working buffer, behind a lock).
    """

    def __init__(self, avatar: Avatar) -> None:
        self.avatar = avatar
        self._out = np.ascontiguousarray(avatar.image).copy()
        self._mouth = _BankPaster(avatar.mouth, avatar.image)
        self._eyes = _BankPaster(avatar.eyes, avatar.image)
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w, c = self._out.shape
        return h, w, c

    def render(
        self, openness: float, width: float, blink: float, seconds: float = 0.0
    ) -> np.ndarray:
        """openness in [0, 1] (0 = closed), width in [-1, 1] (-1 "oo", +1 "ee"),
        blink in [0, 1] (1 = eyes shut; stills only). Values outside are clipped.
        `seconds` (the frame's time) picks a video avatar's clip frame."""
        with self._lock:
            if self.avatar.is_video:
                base = self.avatar.base(seconds)
                np.copyto(self._out, base)
                self._mouth.rebase(base)
            na, nw = self._mouth.shape
            io, to = _grid_pos(openness, 0.0, 1.0, na)
            iw, tw = _grid_pos(width, -1.0, 1.0, nw)
            self._mouth.paste(self._out, io, to, iw, tw)
            if not self.avatar.is_video:
                ib, tb = _grid_pos(blink, 0.0, 1.0, self._eyes.shape[0])
                self._eyes.paste(self._out, ib, tb, 0, 0.0)
            return self._out.copy()
