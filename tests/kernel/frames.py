"""What the guest's readers received: raw frames, the face in them, and its mouth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from livecam.avatar.landmarks import detect_face, landmarks_in_box

INNER_UPPER, INNER_LOWER = [61, 62, 63], [67, 66, 65]  # 68-point layout: inner lip, top / bottom


def read_raw(path: Path, info: dict) -> list[np.ndarray]:
    """BGR frames from a capture whose format ffmpeg reported (yuv420p = YU12/I420)."""
    width, height, fmt = info["width"], info["height"], info["pix_fmt"]
    convert = {"yuv420p": (cv2.COLOR_YUV2BGR_I420, (height * 3 // 2, width)),
               "nv12": (cv2.COLOR_YUV2BGR_NV12, (height * 3 // 2, width)),
               "yuyv422": (cv2.COLOR_YUV2BGR_YUYV, (height, width, 2)),
               "uyvy422": (cv2.COLOR_YUV2BGR_UYVY, (height, width, 2)),
               "bgr24": (None, (height, width, 3))}  # fmt: skip
    code, shape = convert[fmt]
    data = np.fromfile(path, np.uint8)
    size = int(np.prod(shape))
    frames = [data[i : i + size].reshape(shape) for i in range(0, len(data) - size + 1, size)]
    return frames if code is None else [cv2.cvtColor(f, code) for f in frames]


@dataclass(frozen=True)
class MouthTrack:
    box: tuple[int, int, int, int]  # the face detector's box in the reference frame
    opening_px: np.ndarray  # inner-lip gap per frame, from landmarks
    mouth_diff: np.ndarray  # mean abs difference of the mouth region to the closed mouth
    eyes_diff: np.ndarray  # same for the eyes: stays ~0 when only the mouth moves


def _region(lm: np.ndarray, idx: slice, shape: tuple[int, ...], pad: float) -> tuple[slice, slice]:
    pts = lm[idx]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    px, py = (x1 - x0) * pad, (y1 - y0) * pad + 4
    return (slice(max(int(y0 - py), 0), min(int(y1 + py), shape[0])),
            slice(max(int(x0 - px), 0), min(int(x1 + px), shape[1])))  # fmt: skip


def track_mouth(frames: list[np.ndarray]) -> MouthTrack:
    """Find the face once, follow its landmarks through the frames, and compare every
    frame's mouth to the closed mouth (the mouth most frames share: silence, no idle)."""
    face = detect_face(frames[len(frames) // 2])
    lms = [landmarks_in_box(f, face.box) for f in frames]
    opening = np.array([np.mean(lm[INNER_LOWER, 1] - lm[INNER_UPPER, 1]) for lm in lms])
    ref_lm = lms[int(np.argmin(opening))]
    mouth = _region(ref_lm, slice(48, 68), frames[0].shape, 0.6)
    eyes = _region(ref_lm, slice(36, 48), frames[0].shape, 0.3)
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY).astype(np.float32) for f in frames]
    crops = np.stack([g[mouth] for g in gray])
    pair = np.stack([np.abs(crops - c).mean(axis=(1, 2)) for c in crops])
    closed = int(np.argmax((pair < 1.5).sum(axis=1)))
    eye_crops = np.stack([g[eyes] for g in gray])
    return MouthTrack(
        box=face.box,
        opening_px=opening,
        mouth_diff=pair[closed],
        eyes_diff=np.abs(eye_crops - eye_crops[closed]).mean(axis=(1, 2)),
    )
