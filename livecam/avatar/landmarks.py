"""Offline face detection and 68-point landmarks, with MediaPipe's face landmarker models
(Apache-2.0, bundled in facemodels/) run by OpenCV's DNN module: nothing else to install.

BlazeFace (short range, 128x128 input) finds the faces; the face mesh model places 478
points in a 256x256 crop turned so that the eyes are level, twice: from the detector's box,
then from its own first answer. 68 of the 478 are kept, in the iBUG 300-W layout the rest of
livecam uses: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips
60-67.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from livecam.hashing import sha256_file

MODELS_DIR = Path(__file__).with_name("facemodels")
DETECTOR_FILE, MESH_FILE = "face_detector.tflite", "face_landmarks_detector.tflite"
MODEL_SHA256 = {
    DETECTOR_FILE: "b4578f35940bf5a1a655214a1cce5cab13eba73c1297cd78e1a04c2380b0152f",
    MESH_FILE: "c7d54204ce0448474c7f3fa9af494787c0965cbdd6f20fc72867e43046bd43d5",
}
DETECTOR_SIZE, MESH_SIZE = 128, 256  # the models' square inputs (px)
CANDIDATE_SCORE = 0.4  # a detection in the scan worth a second look
MIN_SCORE = 0.75  # on the second look (the face half the window, centred): a face
CONFIRM_WINDOW = 2.0
SAME_FACE_IOU = 0.3  # overlapping detections above this are one face
CROP_SCALE = 1.5  # the mesh model's crop: the face's extent times this
MIN_WINDOW = 256  # small faces: windows of half the size, down to this many px
LANDMARKER = "mediapipe-face-landmarker-1"  # avatar caches record it: a new one rebuilds them

# The mesh point standing for each of the 68 (chosen as the nearest, in mirror-image pairs,
# to dlib's 68-point model on the bundled photos: 3.8 % of the eye distance on average).
MESH_TO_68 = np.array([
    127, 234, 177, 215, 172, 136, 149, 148, 152, 377, 378, 365, 397, 435, 401, 454, 356,  # jaw
    156, 63, 105, 66, 107, 336, 296, 334, 293, 383,  # brows
    168, 197, 195, 4, 240, 97, 94, 326, 460,  # nose
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes
    61, 74, 37, 0, 267, 304, 291, 321, 314, 17, 84, 91,  # outer lips
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips
])  # fmt: skip
RIGHT_EYE_CORNER, LEFT_EYE_CORNER = 33, 263  # mesh points: the person's right, left eye


class NoFaceError(ValueError):
    """No face was found in the image."""


class FaceModelError(RuntimeError):
    """A bundled face model is missing or damaged (livecam's install is broken)."""


@dataclass(frozen=True)
class FaceDetection:
    landmarks: np.ndarray  # (68, 2) float32 x, y
    box: tuple[int, int, int, int]  # x, y, w, h of the detector box
    faces_found: int


@dataclass(frozen=True)
class _Face:
    score: float
    box: np.ndarray  # (4,) x, y, w, h in the picture's px
    eyes: np.ndarray  # (2, 2) the person's right eye, then the left


def _anchors() -> np.ndarray:
    """(896, 2) BlazeFace anchor centres in the unit square: 2 per cell of the 16x16 grid
    (stride 8), then 6 per cell of the 8x8 grid (stride 16)."""
    centres = []
    for cells, per_cell in ((16, 2), (8, 6)):
        y, x = np.mgrid[0:cells, 0:cells]
        grid = np.c_[x.ravel(), y.ravel()].astype(np.float32)
        centres.append(np.repeat((grid + 0.5) / cells, per_cell, axis=0))
    return np.concatenate(centres)


_ANCHORS = _anchors()
_lock = threading.Lock()  # cv2.dnn nets are not thread-safe
_nets: tuple[cv2.dnn.Net, cv2.dnn.Net] | None = None


def _read(name: str) -> cv2.dnn.Net:
    path = MODELS_DIR / name
    if not path.is_file():
        raise FaceModelError(f"face model missing: {path} (reinstall livecam)")
    if sha256_file(path) != MODEL_SHA256[name]:
        raise FaceModelError(f"face model damaged: {path} (not the file livecam shipped; "
                             "reinstall livecam)")  # fmt: skip
    return cv2.dnn.readNetFromTFLite(str(path))


def _load() -> tuple[cv2.dnn.Net, cv2.dnn.Net]:
    global _nets
    if _nets is None:
        _nets = (_read(DETECTOR_FILE), _read(MESH_FILE))
    return _nets


def check_models() -> None:
    """Load the bundled models (once): FaceModelError if one is missing or damaged."""
    with _lock:
        _load()


def _crop(
    image: np.ndarray, centre: np.ndarray, size: float, angle: float, out: int
) -> tuple[np.ndarray, np.ndarray]:
    """The square of side `size` around `centre`, turned by -angle, as out x out px (black
    beyond the picture), and the 2x3 matrix that maps picture px to crop px."""
    k = out / max(size, 1.0)
    cos, sin = math.cos(angle) * k, math.sin(angle) * k
    rotate = np.array([[cos, sin], [-sin, cos]])
    matrix = np.c_[rotate, out / 2 - rotate @ centre]
    return cv2.warpAffine(image, matrix, (out, out), flags=cv2.INTER_LINEAR), matrix


def _detect_in(
    image: np.ndarray, centre: np.ndarray, side: float, angle: float, min_score: float
) -> list[_Face]:
    """BlazeFace on the square window of side `side` around `centre`, turned by -angle."""
    crop, matrix = _crop(image, centre, side, angle, DETECTOR_SIZE)
    blob = cv2.dnn.blobFromImage(crop, 1 / 127.5, mean=(127.5,) * 3, swapRB=True)  # [-1, 1]
    detector, _ = _load()
    detector.setInput(blob)
    raw = detector.forward("regressors")[0]  # (896, 16) crop px, from the anchor centres
    logits = detector.forward("classificators")[0, :, 0]
    scores = 1 / (1 + np.exp(-np.clip(logits, -50, 50)))
    back = cv2.invertAffineTransform(matrix)
    faces = []
    for i in np.flatnonzero(scores > min_score):
        anchor = _ANCHORS[i] * DETECTOR_SIZE
        points = np.r_[raw[i, :2], raw[i, 4:8]].reshape(3, 2) + anchor  # centre, eyes
        points = points @ back[:, :2].T + back[:, 2]
        size = raw[i, 2:4] * side / DETECTOR_SIZE
        faces.append(_Face(float(scores[i]), np.r_[points[0] - size / 2, size], points[1:]))
    return faces


def _starts(length: int, side: float) -> np.ndarray:
    """Window starts along one axis, half a window apart, the last one flush with the end
    (one centred window where the picture is no longer than a window)."""
    if side >= length:
        return np.array([(length - side) / 2])
    return np.linspace(0, length - side, math.ceil((length - side) / (side / 2)) + 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _one_per_face(faces: list[_Face]) -> list[_Face]:
    """The best of each group of overlapping detections."""
    kept: list[_Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(_iou(face.box, other.box) <= SAME_FACE_IOU for other in kept):
            kept.append(face)
    return kept


def _confirmed(image: np.ndarray, face: _Face) -> _Face | None:
    """The detector again, on a window centred on the face at the size it sees best: a face
    scores 0.8-1 there, what only looked like one (noise, small patterns) not at all. And
    on that window upside down: a face upside down may pass as one the right way up, its
    eyes swapped (a mesh on that is nonsense), but it scores higher turned upright."""
    side = float(max(face.box[2:])) * CONFIRM_WINDOW
    centre = face.box[:2] + face.box[2:] / 2
    again = [f for angle in (0.0, math.pi)
             for f in _detect_in(image, centre, side, angle, MIN_SCORE)
             if _iou(f.box, face.box) > SAME_FACE_IOU]  # fmt: skip
    return max(again, key=lambda f: f.score, default=None)


def _find_faces(image: np.ndarray) -> list[_Face]:
    """One detection per face, down to about a thirtieth of the picture's width: the whole
    picture, then windows of half the size, half a window apart, and so on."""
    h, w = image.shape[:2]
    sides = [float(max(h, w))]
    while sides[-1] / 2 >= MIN_WINDOW:
        sides.append(sides[-1] / 2)
    windows = [(np.array([x, y]) + side / 2, side)
               for side in sides for y in _starts(h, side) for x in _starts(w, side)]  # fmt: skip
    found = [f for centre, side in windows
             for f in _detect_in(image, centre, side, 0.0, CANDIDATE_SCORE)]  # fmt: skip
    confirmed = [_confirmed(image, f) for f in _one_per_face(found)]
    return _one_per_face([f for f in confirmed if f is not None])


def _mesh(image: np.ndarray, centre: np.ndarray, size: float, angle: float) -> np.ndarray:
    """(478, 2) mesh points in picture px, from the crop of the face at `centre`."""
    crop, matrix = _crop(image, centre, size, angle, MESH_SIZE)
    _, mesh = _load()
    mesh.setInput(cv2.dnn.blobFromImage(crop, 1 / 255.0, swapRB=True))  # [0, 1]
    points = mesh.forward("Identity").reshape(-1, 3)[:, :2]  # (478, 2) crop px
    back = cv2.invertAffineTransform(matrix)
    return points @ back[:, :2].T + back[:, 2]


def _remesh(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The mesh again, from the crop its own points call for (eyes level)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    eyes = points[LEFT_EYE_CORNER] - points[RIGHT_EYE_CORNER]
    angle = math.atan2(eyes[1], eyes[0])
    return _mesh(image, (lo + hi) / 2, float(max(hi - lo)) * CROP_SCALE, angle)


def _check(image_bgr: np.ndarray) -> None:
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 BGR, got {image_bgr.shape} {image_bgr.dtype}")


def detect_face(image_bgr: np.ndarray) -> FaceDetection:
    """Find the largest face in a BGR uint8 image and its 68 landmarks."""
    _check(image_bgr)
    with _lock:
        faces = _find_faces(image_bgr)
        if not faces:
            raise NoFaceError("no face found")
        face = max(faces, key=lambda f: f.box[2] * f.box[3])
        eyes = face.eyes[1] - face.eyes[0]
        centre, size = face.box[:2] + face.box[2:] / 2, float(max(face.box[2:])) * CROP_SCALE
        points = _mesh(image_bgr, centre, size, math.atan2(eyes[1], eyes[0]))
        points = _remesh(image_bgr, points)
    x, y, w, h = (round(float(v)) for v in face.box)
    return FaceDetection(points[MESH_TO_68].astype(np.float32), (x, y, w, h), len(faces))


def landmarks_in_box(image_bgr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 68 landmarks of the face in a known box (x, y, w, h): following a face from one
    video frame to the next without running the detector again."""
    _check(image_bgr)
    x, y, w, h = box
    with _lock:
        points = _mesh(image_bgr, np.array([x + w / 2, y + h / 2]), max(w, h) * CROP_SCALE, 0.0)
        points = _remesh(image_bgr, points)
    return points[MESH_TO_68].astype(np.float32)
