"""A contact sheet of an avatar's mouth shapes and blink, for `livecam avatars show`."""

from __future__ import annotations

import cv2
import numpy as np

from livecam.avatar.face import FaceRenderer
from livecam.avatar.model import Avatar

OPENNESS = (0.0, 0.25, 0.5, 0.75, 1.0)
WIDTHS = (-1.0, 0.0, 1.0)
TILE = 192


def contact_sheet(avatar: Avatar) -> np.ndarray:
    """Rows: width -1, 0, +1 (plus a blink row); columns: openness 0 .. 1; face crops."""
    renderer = FaceRenderer(avatar)
    marks = avatar.landmarks
    x0, y0 = marks.min(0)
    x1, y1 = marks.max(0)
    pad = 0.15 * (x1 - x0)
    box = [int(max(0, x0 - pad)), int(max(0, y0 - pad)), int(x1 + pad), int(y1 + pad)]

    def tile(openness: float, width: float, blink: float) -> np.ndarray:
        face = renderer.render(openness, width, blink)[box[1] : box[3], box[0] : box[2]]
        return cv2.resize(face, (TILE, TILE), interpolation=cv2.INTER_AREA)

    rows = [np.hstack([tile(o, w, 0.0) for o in OPENNESS]) for w in WIDTHS]
    rows.append(np.hstack([tile(0.0, 0.0, b) for b in np.linspace(0, 1, len(OPENNESS))]))
    return np.vstack(rows)
