"""Offline face detection and 68-point landmarks (dlib HOG + face-recognition-models).

The 68-point layout is iBUG 300-W: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
outer lips 48-59, inner lips 60-67. The predictor was trained on 300-W, whose data
license is non-commercial (see avatars/README.md).
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
UPSAMPLE = 1  # HOG detector upsampling: finds faces down to ~40 px

_lock = threading.Lock()
_models: tuple[Any, Any] | None = None


class NoFaceError(ValueError):
    """No face was found in the image."""


@dataclass(frozen=True)
class FaceDetection:
    landmarks: np.ndarray  # (68, 2) float32 x, y
    box: tuple[int, int, int, int]  # x, y, w, h of the detector box
    faces_found: int


def models_dir() -> Path:
    """The face_recognition_models data folder, found without importing the package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face-recognition-models is not installed (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _load() -> tuple[Any, Any]:
    global _models
    with _lock:
        if _models is None:
            import dlib

            path = models_dir() / PREDICTOR_FILE
            if not path.is_file():
                raise RuntimeError(f"landmark model missing: {path}")
            _models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))
        return _models


def detect_face(image_bgr: np.ndarray) -> FaceDetection:
    """Find the largest face in a BGR uint8 image and its 68 landmarks."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 BGR, got {image_bgr.shape} {image_bgr.dtype}")
    detector, predictor = _load()
    rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    rects = detector(rgb, UPSAMPLE)
    if len(rects) == 0:
        raise NoFaceError("no face found")
    rect = max(rects, key=lambda r: r.width() * r.height())
    shape = predictor(rgb, rect)
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    box = (int(rect.left()), int(rect.top()), int(rect.width()), int(rect.height()))
    return FaceDetection(landmarks=pts, box=box, faces_found=len(rects))


def landmarks_in_box(image_bgr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 68 landmarks of the face in a known box (x, y, w, h): tracking from one video
    frame to the next without running the detector again."""
    import dlib

    _, predictor = _load()
    rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    x, y, w, h = box
    shape = predictor(rgb, dlib.rectangle(x, y, x + w, y + h))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
