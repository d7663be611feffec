"""Video avatars: a short clip becomes stabilized frames plus the head motion to replay.

Every frame is aligned to the first one by a similarity transform fitted on the stable
landmarks (brows, nose, eye corners) and smoothed over time, so the mouth and eye banks
built on the first frame fit every frame. The compositor re-applies the recorded motion,
so the head moves as it did in the clip; the clip plays forward, then backward, without a
jump at the loop.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from livecam.avatar.landmarks import NoFaceError, detect_face, landmarks_in_box
from livecam.limits import LimitError, check_pixels

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v"}
MAX_SECONDS = 3.0  # of the clip kept: 6 s per forward-backward loop, ~70 MB of frames
FRAME_RATE = 25.0  # frames kept per second of clip
MAX_HEIGHT = 480  # frames are downscaled to at most this height
STABLE = np.r_[17:27, 27:31, 36, 39, 42, 45]  # brows, nose bridge, eye corners
SMOOTH = 2  # motion parameters averaged over +-2 frames (landmark jitter)


class VideoError(ValueError):
    """The clip cannot become an avatar; the message says why."""


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_clip(path: Path) -> tuple[list[np.ndarray], float]:
    """(up to MAX_SECONDS of BGR frames, at most MAX_HEIGHT tall, their frame rate): the
    clip's own rate, thinned to FRAME_RATE if faster."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"cannot read video {path}")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        check_pixels(f"video {path}", width, height)
    except LimitError as exc:
        capture.release()
        raise VideoError(str(exc)) from None
    rate = capture.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(rate) or not 0 < rate <= 1000:
        rate = FRAME_RATE  # unknown or absurd: assume a common rate
    step = max(rate / FRAME_RATE, 1.0)
    kept_rate = rate / step
    frames: list[np.ndarray] = []
    index, take = 0, 0.0
    while len(frames) < MAX_SECONDS * kept_rate:
        ok, frame = capture.read()
        if not ok:
            break
        if index >= take:
            take += step
            if frame.shape[0] > MAX_HEIGHT:
                scale = MAX_HEIGHT / frame.shape[0]
                size = (round(frame.shape[1] * scale) // 2 * 2, MAX_HEIGHT)
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            frames.append(frame)
        index += 1
    capture.release()
    if len(frames) < 2:
        raise VideoError(f"cannot read video {path}: fewer than 2 frames could be decoded")
    return frames, kept_rate


def track_landmarks(frames: list[np.ndarray]) -> np.ndarray:
    """(N, 68, 2): the detector on every frame (~50 ms each at 480 px on 2 cores, with the
    landmarks); a frame it misses reuses the previous frame's box."""
    first = detect_face(frames[0])  # NoFaceError: the clip must start on a face
    box, out = first.box, [first.landmarks]
    for frame in frames[1:]:
        try:
            found = detect_face(frame)
        except NoFaceError:
            out.append(landmarks_in_box(frame, box))
            continue
        box = found.box
        out.append(found.landmarks)
    return np.stack(out)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None:
        raise VideoError("the face moves too much in the clip to be followed")
    return m


def _params(m: np.ndarray) -> np.ndarray:
    """(log scale, angle, tx, ty) of a similarity, for averaging."""
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    return np.array([np.log(scale), np.arctan2(m[1, 0], m[0, 0]), m[0, 2], m[1, 2]])


def _matrix(p: np.ndarray) -> np.ndarray:
    s, a = np.exp(p[0]), p[1]
    return np.array([[s * np.cos(a), -s * np.sin(a), p[2]], [s * np.sin(a), s * np.cos(a), p[3]]])


def stabilize(
    frames: list[np.ndarray], landmarks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames aligned to the first, (N, 2, 3) motion from the first frame's coordinates
    to each original frame, (N, 68, 2) landmarks in aligned coordinates)."""
    params = np.array([_params(_similarity(lm[STABLE], landmarks[0][STABLE])) for lm in landmarks])
    kernel = np.ones(2 * SMOOTH + 1) / (2 * SMOOTH + 1)
    padded = np.pad(params, ((SMOOTH, SMOOTH), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, j], kernel, "valid") for j in range(4)], axis=1)
    h, w = frames[0].shape[:2]
    aligned, motion, points = [], [], []
    for frame, lm, p in zip(frames, landmarks, smooth, strict=True):
        to_ref = _matrix(p)
        aligned.append(cv2.warpAffine(frame, to_ref, (w, h), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REFLECT))  # fmt: skip
        motion.append(cv2.invertAffineTransform(to_ref))
        points.append(lm @ to_ref[:, :2].T + to_ref[:, 2])
    return np.stack(aligned), np.stack(motion).astype(np.float32), np.stack(points)
