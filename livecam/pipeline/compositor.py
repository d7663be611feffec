"""Places the avatar image into the fixed-size camera frame, with idle head motion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from livecam.avatar import idle
from livecam.pipeline.quadwarp import QuadWarp, Window

FACE_SHARE = 0.33  # brow-to-chin height as a share of the frame height: webcam framing
EYES_AT = 0.42  # eye line this far down the frame
MAX_ZOOM = 2.0  # never enlarge the photo more than this


@dataclass(frozen=True)
class Framing:
    """Which part of the avatar image the camera shows, and where the head pivots."""

    crop: tuple[float, float, float, float]  # x, y, w, h in avatar pixels
    pivot: tuple[float, float]  # the neck, for head sway
    face_height: float  # brow to chin, avatar pixels


def webcam_framing(landmarks: np.ndarray, image_shape: tuple[int, ...], aspect: float) -> Framing:
    """Head-and-shoulders framing like a webcam's, within the photo's limits."""
    img_h = image_shape[0]
    brow_y = float(landmarks[17:27, 1].min())
    chin_x, chin_y = (float(v) for v in landmarks[8])
    face_height = chin_y - brow_y
    eye_y = float(landmarks[36:48, 1].mean())
    centre_x = float(landmarks[27:36, 0].mean())
    crop_h = min(float(img_h), max(face_height / FACE_SHARE, img_h / MAX_ZOOM))
    y0 = min(max(eye_y - EYES_AT * crop_h, 0.0), img_h - crop_h)
    crop_w = crop_h * aspect
    pivot = (chin_x, chin_y + 0.4 * face_height)
    return Framing((centre_x - crop_w / 2, y0, crop_w, crop_h), pivot, face_height)


class Compositor:
    """Draws the avatar image into a (height, width) canvas over a blurred backdrop.

    The framing's crop fills the canvas; where the photo ends, a blurred, darkened copy of
    it continues so the frame has no empty borders. Head sway rotates about the neck; a
    video avatar replays its recorded head motion instead (`head_motion(frame)`: 2x3).
    """

    def __init__(
        self,
        avatar_image: np.ndarray,
        framing: Framing,
        width: int,
        height: int,
        fps: float,
        idle_motion: bool = True,
        head_motion: Callable[[int], np.ndarray] | None = None,
        max_shift: float = 0.0,  # how far head_motion moves the image, in avatar pixels
        head_box: tuple[float, float, float, float] | None = None,  # x0, y0, x1, y1 (avatar)
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.idle_motion = idle_motion
        self.head_motion = head_motion
        self.framing = framing
        x, y, _, h = framing.crop
        scale = height / h
        self._fit = np.array([[scale, 0, -x * scale], [0, scale, -y * scale], [0, 0, 1]])
        self.backdrop = _backdrop(avatar_image, self._fit[:2], width, height)
        # warp only into the columns the photo can reach, plus room for the sway
        margin = int(0.03 * width + max_shift * scale)
        left, right = -x * scale, (avatar_image.shape[1] - x) * scale
        self._x0 = int(min(max(0, left - margin), width - 2))
        self._x1 = int(max(min(width, right + margin), self._x0 + 2))
        self._quad = QuadWarp()
        self._head: _HeadRegion | None = None
        if head_motion is None and head_box is not None:
            # a still photo: only the head moves (mouth, eyes, sway); the rest is drawn once
            still = self.backdrop.copy()
            self._warp(avatar_image, self._fit[:2], still)
            self._head = _HeadRegion.around(head_box, self._fit, framing, width, height, still)

    def transform(self, frame_index: int) -> np.ndarray:
        """2x3 affine map from avatar pixels to canvas pixels for a frame."""
        if self.head_motion is not None:
            return (self._fit @ np.vstack([self.head_motion(frame_index), [0, 0, 1]]))[:2]
        angle, dx, dy, zoom = (
            idle.sway(frame_index / self.fps) if self.idle_motion else (0.0, 0.0, 0.0, 1.0)
        )
        sway = cv2.getRotationMatrix2D(self.framing.pivot, angle, zoom)
        sway[0, 2] += dx * self.framing.face_height
        sway[1, 2] += dy * self.framing.face_height
        return (self._fit @ np.vstack([sway, [0, 0, 1]]))[:2]

    def compose(
        self, image: np.ndarray, frame_index: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The canvas (height, width, 3) uint8 BGR with the avatar image placed: a new array,
        or `out` drawn again: a canvas this compositor returned before, unchanged since (a
        still photo's frame is then redrawn only where the head moves)."""
        if self._head is not None:
            return self._head.compose(image, self.transform(frame_index), out)
        return self.compose_whole(image, frame_index, out)

    def compose_whole(
        self, image: np.ndarray, frame_index: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """compose() by warping the whole photo (video avatars; the reference for the head)."""
        if out is None:
            out = self.backdrop.copy()
        else:
            np.copyto(out, self.backdrop)
        self._warp(image, self.transform(frame_index), out)
        return out

    def _warp(self, image: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
        m = m.copy()
        m[0, 2] -= self._x0
        self._quad.warp(image, m, out[:, self._x0 : self._x1])


HEAD_MARGIN = 0.55  # around the landmarks (brow to chin), in face heights: hair, ears, neck
FEATHER = 0.12  # the swayed head fades into the still picture over this many face heights


@dataclass(frozen=True)
class _Seam:
    """A strip of the head rectangle where the swayed head fades into the still picture."""

    rows: slice
    cols: slice
    alpha: np.ndarray  # (rows, 3 * cols) float32 weights of the swayed head, per channel
    beta: np.ndarray  # 1 - alpha

    @classmethod
    def of(cls, alpha: np.ndarray, rows: slice, cols: slice) -> _Seam:
        weights = np.repeat(alpha[rows, cols], 3, axis=1)  # B, G and R get their pixel's
        return cls(rows, cols, weights, 1.0 - weights)

    def blend(self, head: np.ndarray, still: np.ndarray) -> None:
        """head = alpha * head + beta * still in the strip, in place. As one channel of
        3 * cols values: OpenCV blends that a fifth faster than 3 channels, same values."""
        strip = head[self.rows, self.cols]
        values = strip.reshape(strip.shape[0], -1)  # a view: each row's pixels are contiguous
        back = still[self.rows, self.cols].reshape(values.shape)
        cv2.blendLinear(values, back, self.alpha, self.beta, dst=values)


@dataclass
class _HeadRegion:
    """The canvas rectangle where the head moves, with a feathered edge; the rest is fixed.

    The sway is at most about a degree about the neck, so outside a margin around the head
    the full-frame warp moves pixels by a pixel or two: drawing that part once and warping
    only the head (a third of the photo's area) looks the same and costs a third. The head is
    warped straight into the frame; only the strips along the edge are blended.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    still: np.ndarray  # (H, W, 3) the canvas with the photo placed, no sway
    alpha: np.ndarray  # (h, w) float32: 1 inside, fading to 0 at the rectangle's edge
    seams: list[_Seam]  # where alpha < 1
    quad: QuadWarp = field(default_factory=QuadWarp)

    @classmethod
    def around(
        cls, box: tuple[float, float, float, float], fit: np.ndarray, framing: Framing,
        width: int, height: int, still: np.ndarray,
    ) -> _HeadRegion:  # fmt: skip
        pad = HEAD_MARGIN * framing.face_height
        corners = np.array([[box[0] - pad, box[1] - pad, 1], [box[2] + pad, box[3] + pad, 1]])
        (x0, y0), (x1, y1) = (corners @ fit[:2].T).round().astype(int)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(max(x1, x0 + 2), width), min(max(y1, y0 + 2), height)
        feather = max(2.0, FEATHER * framing.face_height * fit[0, 0])
        h, w, inf = y1 - y0, x1 - x0, np.inf
        fades = (y0 > 0, y1 < height, x0 > 0, x1 < width)  # not where it meets the canvas edge
        top = np.arange(h) + 0.5 if fades[0] else np.full(h, inf)
        bottom = np.arange(h, 0, -1) - 0.5 if fades[1] else np.full(h, inf)
        left = np.arange(w) + 0.5 if fades[2] else np.full(w, inf)
        right = np.arange(w, 0, -1) - 0.5 if fades[3] else np.full(w, inf)
        edge = np.minimum(np.minimum(top, bottom)[:, None], np.minimum(left, right)[None, :])
        alpha = np.clip(edge / feather, 0.0, 1.0).astype(np.float32)
        return cls(x0, y0, x1, y1, still, alpha, _seams(alpha, int(np.ceil(feather)), fades))

    def compose(self, image: np.ndarray, m: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """The frame, drawn into `out` (an earlier frame: only its head region is redrawn)."""
        rows, cols = slice(self.y0, self.y1), slice(self.x0, self.x1)
        still = self.still[rows, cols]
        out = self.still.copy() if out is None else out
        region = out[rows, cols]
        window = self._window(m, image.shape)
        m = m.copy()
        m[0, 2] -= self.x0
        m[1, 2] -= self.y0
        if window is None:  # where the photo does not reach, the still picture stays
            region[...] = still  # (outside the head the canvas is the still picture already)
        self.quad.warp(image, m, region, window)
        for seam in self.seams:
            seam.blend(region, still)
        return out

    def _window(self, m: np.ndarray, shape: tuple[int, ...]) -> Window | None:
        """The part of the photo the head comes from, bilinear neighbours included; None
        where the head reaches past the photo or within a pixel of its edge."""
        corners = np.array([[self.x0, self.y0], [self.x1, self.y1], [self.x0, self.y1],
                            [self.x1, self.y0]], np.float64)  # fmt: skip
        src = cv2.transform(corners[None], cv2.invertAffineTransform(m))[0]
        (x0, y0), (x1, y1) = np.floor(src.min(axis=0)), np.ceil(src.max(axis=0))
        if min(x0, y0) < 1 or x1 > shape[1] - 3 or y1 > shape[0] - 3:
            return None
        return slice(int(y0) - 1, int(y1) + 3), slice(int(x0) - 1, int(x1) + 3)


def _seams(alpha: np.ndarray, depth: int, fades: tuple[bool, bool, bool, bool]) -> list[_Seam]:
    """The strips `depth` deep along the sides that fade (top, bottom, left, right): the top
    and bottom ones across the whole width, the left and right ones between them."""
    h, w = alpha.shape
    top = min(depth, h) if fades[0] else 0
    bottom = max(h - depth, top) if fades[1] else h
    left = min(depth, w) if fades[2] else 0
    right = max(w - depth, left) if fades[3] else w
    rows, middle = (slice(0, top), slice(bottom, h)), slice(top, bottom)
    strips = [(r, slice(0, w)) for r in rows] + [
        (middle, slice(0, left)),
        (middle, slice(right, w)),
    ]
    return [_Seam.of(alpha, r, c) for r, c in strips if alpha[r, c].size]


def _backdrop(image: np.ndarray, fit: np.ndarray, width: int, height: int) -> np.ndarray:
    filled = cv2.warpAffine(
        image, fit, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT
    )
    small = cv2.resize(filled, (width // 8, height // 8), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(small, (0, 0), 4)
    out = cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR)
    return (out * 0.6).astype(np.uint8)
