"""Blink bank: the upper lids slide down over the eyes (level 0 = the photo).

A per-column vertical map: the lid margin moves down rigidly (lashes stay thin), the
skin between it and the brow stretches, and below the moved lid the photo shows.
"""

from __future__ import annotations

import numpy as np

from livecam.avatar.model import BankParams, PatchBank
from livecam.avatar.warp import Roi, clip_roi, feather_mask, remap_split, smooth_curve

# (upper lid points, matching lower lid points, corners) per eye; brows above them
EYES = (([37, 38], [41, 40], (36, 39)), ([43, 44], [47, 46], (42, 45)))
BROWS = (list(range(17, 22)), list(range(22, 27)))


def eye_roi(lm: np.ndarray, shape: tuple[int, ...], max_y: int) -> Roi:
    """Both eyes and brows; the bottom stays above max_y (the mouth ROI top)."""
    ew = float(np.hypot(*(lm[39] - lm[36])))
    x0 = min(lm[17, 0], lm[36, 0]) - 0.5 * ew
    x1 = max(lm[26, 0], lm[45, 0]) + 0.5 * ew
    y0 = lm[17:27, 1].min() - 0.4 * ew
    y1 = min(lm[40:48, 1].max() + 0.8 * ew, max_y)
    return clip_roi(x0, y0, x1, y1, shape)


Curves = tuple[np.ndarray, np.ndarray, np.ndarray]


def _lid_curves(src: np.ndarray, b: float, xs: np.ndarray) -> list[Curves]:
    """Per eye, over xs: upper-lid y in the photo, at blink level b (same at the corners),
    and the highest y that may stretch (below the brow)."""
    out = []
    for (upper, lower, (c0, c1)), brow in zip(EYES, BROWS, strict=True):
        ew = float(np.hypot(*(src[c1] - src[c0])))
        travel = src[lower] - src[upper]
        travel[:, 1] += 0.08 * ew  # overshoot a little so no eye white is left
        curves = []
        for lid in (src[upper], src[upper] + b * travel):
            c = smooth_curve(np.concatenate([src[[c0]], lid, src[[c1]]]))
            c = c[np.argsort(c[:, 0])]
            curves.append(np.interp(xs, c[:, 0], c[:, 1]))
        brow_y = np.interp(xs, src[brow, 0], src[brow, 1]) + 0.3 * ew
        out.append((curves[0], curves[1], np.maximum(curves[0] - 0.45 * ew, brow_y)))
    return out


def _blink_dy(curves: Curves, ys: np.ndarray, ew: float) -> np.ndarray:
    """Vertical backward displacement for one eye: the lid margin (height m) slides down
    rigidly, the skin between it and `top` stretches, the rest stays."""
    lid_src, lid_dst, top = curves
    m = 0.1 * ew
    y = ys[:, None]
    src_y = y.copy() + 0 * lid_src[None, :]
    margin_top = lid_dst - m
    stretch = (y >= top) & (y < margin_top)
    ratio = (lid_src - m - top) / np.maximum(margin_top - top, 1e-6)
    src_y = np.where(stretch, top + (y - top) * ratio, src_y)
    rigid = (y >= margin_top) & (y <= lid_dst + 1)
    src_y = np.where(rigid, y - (lid_dst - lid_src), src_y)
    return src_y - y


def build_eye_bank(image: np.ndarray, lm: np.ndarray, p: BankParams, max_y: int) -> PatchBank:
    """Blink levels: the upper lids slide down over the eyes (level 0 = the photo)."""
    roi = eye_roi(lm, image.shape, max_y)
    x, y, w, h = roi
    xs, ys = np.arange(w) + float(x), np.arange(h) + float(y)
    left_half = xs[None, :] < (lm[39, 0] + lm[42, 0]) / 2
    ew = float(np.hypot(*(lm[39] - lm[36])) + np.hypot(*(lm[45] - lm[42]))) / 2
    patches = np.empty((p.n_blink, 1, h, w, 3), np.uint8)
    for i, b in enumerate(np.linspace(0, 1, p.n_blink)):
        curves = _lid_curves(lm.astype(np.float64), b, xs)
        dys = [_blink_dy(c, ys, ew) for c in curves]
        disp = np.zeros((h, w, 2))
        disp[..., 1] = np.where(left_half, dys[0], dys[1])
        lid = np.where(left_half, curves[0][1], curves[1][1])
        under = np.clip(ys[:, None] - lid + 0.5, 0, 1)[..., None]  # below the lid: the photo
        patches[i, 0] = remap_split(image, roi, disp, np.zeros_like(disp), under)
    return PatchBank(x, y, patches, feather_mask(w, h))
