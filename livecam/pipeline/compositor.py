"""Places the avatar image into the fixed-size camera frame, with idle head motion."""

from __future__ import annotations

import cv2
import numpy as np

from livecam.pipeline import idle


class Compositor:
    """Fits an avatar-size image into a (height, width) canvas over a blurred backdrop.

    The avatar is scaled to the canvas height (or width, if that is the tighter fit) and
    centred; the sides are filled with a blurred, darkened copy of the photo so the frame
    has no hard borders. Head sway rotates about a point below the face (the neck).
    """

    def __init__(
        self,
        avatar_image: np.ndarray,
        pivot: tuple[float, float],
        face_height: float,
        width: int,
        height: int,
        fps: float,
        idle_motion: bool = True,
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.idle_motion = idle_motion
        h, w = avatar_image.shape[:2]
        self.scale = min(width / w, height / h)
        self.offset = ((width - w * self.scale) / 2, (height - h * self.scale) / 2)
        self.pivot = pivot
        self.face_height = face_height
        self.backdrop = _backdrop(avatar_image, width, height)
        # warp only into the columns the avatar can reach, plus room for the sway
        margin = int(0.03 * width)
        self._x0 = max(0, int(self.offset[0]) - margin)
        self._x1 = min(width, int(self.offset[0] + w * self.scale) + margin)

    def transform(self, frame_index: int) -> np.ndarray:
        """2x3 affine map from avatar pixels to canvas pixels for a frame."""
        angle, dx, dy, zoom = (
            idle.sway(frame_index / self.fps) if self.idle_motion else (0, 0, 0, 1)
        )
        m = cv2.getRotationMatrix2D(self.pivot, angle, zoom)
        m[0, 2] += dx * self.face_height
        m[1, 2] += dy * self.face_height
        fit = np.array([[self.scale, 0, self.offset[0]], [0, self.scale, self.offset[1]]])
        return fit @ np.vstack([m, [0, 0, 1]])

    def compose(self, image: np.ndarray, frame_index: int) -> np.ndarray:
        """A new canvas (height, width, 3) uint8 BGR with the avatar image placed."""
        out = self.backdrop.copy()
        m = self.transform(frame_index)
        m[0, 2] -= self._x0
        cv2.warpAffine(
            image,
            m,
            (self._x1 - self._x0, self.height),
            dst=out[:, self._x0 : self._x1],
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_TRANSPARENT,
        )
        return out


def _backdrop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    cover = max(width / w, height / h)
    big = cv2.resize(image, (round(w * cover), round(h * cover)), interpolation=cv2.INTER_AREA)
    y0, x0 = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    crop = big[y0 : y0 + height, x0 : x0 + width]
    small = cv2.resize(crop, (width // 8, height // 8), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(small, (0, 0), 4)
    out = cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR)
    return (out * 0.6).astype(np.uint8)
