"""In-memory avatar data: the still image, its landmarks and the lite patch banks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class BankParams:
    """Lite bank build parameters; recorded in the cache manifest (a change rebuilds)."""

    n_open: int = 11  # openness levels, uniform over [0, 1]
    n_width: int = 3  # width levels, uniform over [-1, 1]
    n_blink: int = 4  # blink levels, uniform over [0, 1]
    max_gap: float = 0.35  # inner lip gap at openness 1, x mouth width
    close_upper: float = 0.3  # share of an open photo's lip gap closed by the upper lip

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class PatchBank:
    """Pre-rendered ROI patches, pasted at (x, y) through `mask`.

    patches: uint8 (n_a, n_b, h, w, 3); mouth = (n_open, n_width, ...),
    eyes = (n_blink, 1, ...). Level grids are uniform over [0, 1] (openness, blink)
    and [-1, 1] (width).
    """

    x: int
    y: int
    patches: np.ndarray
    mask: np.ndarray  # float32 (h, w, 1) alpha 0..1

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the ROI."""
        return int(self.patches.shape[3]), int(self.patches.shape[2])


@dataclass
class Avatar:
    """A prepared avatar. `image` is the (resized) source photo as is; the lite
    renderer's neutral frame (closed mouth) is FaceRenderer.render(0, 0, 0).

    From a video, `frames` are the clip's frames aligned to `image` (its first frame) and
    `motion` maps image coordinates to where the head was in each original frame."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8 BGR, H <= 720
    landmarks: np.ndarray  # (68, 2) float32 in image coords
    mouth: PatchBank
    eyes: PatchBank
    warnings: list[str] = field(default_factory=list)
    frames: np.ndarray | None = None  # (N, H, W, 3) uint8, video avatars only
    motion: np.ndarray | None = None  # (N, 2, 3) float32, video avatars only
    clip_rate: float = 0.0  # frames per second of the clip, video avatars only

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    def clip_index(self, seconds: float) -> int:
        """The clip frame shown at this time: the clip plays at its own speed, forward and
        then backward (no jump at the loop)."""
        n = 1 if self.frames is None else len(self.frames)
        if n == 1:
            return 0
        j = int(seconds * self.clip_rate + 1e-6) % (2 * n - 2)
        return j if j < n else 2 * n - 2 - j

    def base(self, seconds: float) -> np.ndarray:
        """The image shown at this time, before the mouth (and eyes) go in."""
        return self.image if self.frames is None else self.frames[self.clip_index(seconds)]

    def mouth_box(self) -> tuple[int, int, int, int]:
        """x, y, w, h of the lips (landmarks 48-67) in image coords."""
        pts = self.landmarks[48:68]
        x0, y0 = np.floor(pts.min(0)).astype(int)
        x1, y1 = np.ceil(pts.max(0)).astype(int)
        return int(x0), int(y0), int(x1 - x0), int(y1 - y0)
