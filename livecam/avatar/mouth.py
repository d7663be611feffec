"""Mouth-shape bank: warp lips and jaw with two TPS fields, paint the inner mouth.

Openness 0 always gives closed lips that meet, also when the photo's mouth is open:
the upper field maps the seam onto the photo's upper-lip edge, the lower field onto its
lower-lip edge, so teeth in the photo are never sampled at the seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from livecam.avatar.model import BankParams, PatchBank
from livecam.avatar.warp import (
    Roi,
    clip_roi,
    feather_mask,
    remap_split,
    roi_field,
    smooth_curve,
    split_weight,
)

# iBUG 68-point indices
UPPER_INNER = [61, 62, 63]  # left -> right, paired with LOWER_INNER and the outer points
LOWER_INNER = [67, 66, 65]
UPPER_OUTER_MID = [50, 51, 52]
LOWER_OUTER_MID = [58, 57, 56]
JAW_MOVING = list(range(5, 12))
JAW_FIXED = [0, 1, 2, 3, 4, 12, 13, 14, 15, 16]
NOSE = [30, 31, 32, 33, 34, 35]
JAW_WEIGHTS = np.array([0.2, 0.45, 0.7, 0.8, 0.7, 0.45, 0.2])  # share of the lower-lip drop
CURVE_SAMPLES = 6  # spline samples per landmark segment in edge_curves
EDGE_STEP = 35.0  # grey-level jump from lip to teeth or mouth cavity


@dataclass(frozen=True)
class _Frame:
    u: np.ndarray  # unit vector from the left to the right mouth corner
    d: np.ndarray  # unit vector "down" in the face
    center: np.ndarray
    mw: float  # mouth width (outer corners)


def _frame(lm: np.ndarray) -> _Frame:
    v = (lm[54] - lm[48]).astype(np.float64)
    mw = float(np.hypot(*v))
    u = v / mw
    return _Frame(u, np.array([-u[1], u[0]]), (lm[48] + lm[54]) / 2.0, mw)


def mouth_roi(lm: np.ndarray, shape: tuple[int, ...]) -> Roi:
    """From the nose tip to well below the chin, between the cheeks."""
    mw = _frame(lm).mw
    x0, x1 = lm[2:15, 0].min() - 0.1 * mw, lm[2:15, 0].max() + 0.1 * mw
    return clip_roi(x0, lm[30, 1], x1, lm[8, 1] + 0.8 * mw, shape)


def _scan_edge(gray: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Walk from the outer lip line toward `end`; return the last lip point before the
    grey level jumps (teeth or mouth cavity), 1.5 px back inside the lip."""
    n = int(np.hypot(*(end - start)) * 2) + 2  # half-pixel steps
    pts = start + np.linspace(0, 1, n)[:, None] * (end - start)
    xs, ys = pts[:, 0].astype(np.float32)[None], pts[:, 1].astype(np.float32)[None]
    vals = cv2.remap(gray, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]
    lip = float(np.median(vals[: max(2, n // 5)]))
    jump = np.abs(vals - lip) > EDGE_STEP
    jump[: n // 4] = False
    k = int(np.argmax(jump)) if jump.any() else n - 1
    return pts[max(k - 3, n // 4)]


def source_curves(image: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """edge_curves(src), each point snapped onto the visible lip edge where the photo's
    mouth is open, scanning from the outer lip line (dense, so teeth never leak)."""
    f = _frame(src)
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (0, 0), 0.8)
    gray = gray.astype(np.float32)
    upper, lower = edge_curves(src)
    outer_up = smooth_curve(src[48:55])
    outer_low = smooth_curve(src[[48, 59, 58, 57, 56, 55, 54]])
    res = [upper.copy(), lower.copy()]
    for k in range(1, len(upper) - 1):
        gap = float((lower[k] - upper[k]) @ f.d)
        if gap < 2.0:
            continue
        for out, curve, outer, sign in (
            (res[0], upper, outer_up, 1),
            (res[1], lower, outer_low, -1),
        ):
            o = outer[np.argmin(np.abs(outer[:, 0] - curve[k, 0]))]
            out[k] = _scan_edge(gray, o, curve[k] + sign * 0.4 * gap * f.d)
    return _smooth_edge(res[0], upper, f.d, 1), _smooth_edge(res[1], lower, f.d, -1)


def _smooth_edge(found: np.ndarray, curve: np.ndarray, d: np.ndarray, sign: int) -> np.ndarray:
    """Remove scan noise: a running extreme toward the lip (sign: 1 upper, -1 lower)
    over 3 samples, then a running mean over 5; the end points stay."""
    off = sign * ((found - curve) @ d)  # more negative = further into the lip
    pad = np.pad(off, 1, mode="edge")
    off = np.minimum(np.minimum(pad[:-2], pad[1:-1]), pad[2:])
    off = np.convolve(np.pad(off, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    off[[0, -1]] = 0.0
    return curve + np.outer(sign * off, d)


def lip_edges(lm: np.ndarray, curves: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Landmarks with the inner lip points moved onto the found lip edges."""
    src = lm.astype(np.float64).copy()
    knots = [CURVE_SAMPLES * (i + 1) for i in range(3)]  # 61-63 / 67-65 on the curves
    src[UPPER_INNER], src[LOWER_INNER] = curves[0][knots], curves[1][knots]
    return src


def _shift_lips(pts: np.ndarray, d: np.ndarray, up: np.ndarray, low: np.ndarray) -> None:
    """Move the upper lip by up[3] and the lower lip by low[3] along d (left, mid, right)."""
    pts[UPPER_INNER] += np.outer(up, d)
    pts[UPPER_OUTER_MID] += np.outer(up, d)
    pts[[49, 53]] += np.outer(0.5 * up[[0, 2]], d)
    pts[LOWER_INNER] += np.outer(low, d)
    pts[LOWER_OUTER_MID] += np.outer(low, d)
    pts[[59, 55]] += np.outer(0.5 * low[[0, 2]], d)


def closed_lips(src: np.ndarray, p: BankParams) -> np.ndarray:
    """Landmarks with the inner lips meeting (and the jaw raised to match)."""
    f = _frame(src)
    out = src.copy()
    gaps = np.maximum(0.0, (src[LOWER_INNER] - src[UPPER_INNER]) @ f.d)
    low_shift = (1 - p.close_upper) * gaps
    _shift_lips(out, f.d, p.close_upper * gaps, -low_shift)
    out[JAW_MOVING] -= np.outer(JAW_WEIGHTS * low_shift.mean(), f.d)
    return out


def mouth_targets(closed: np.ndarray, openness: float, width: float, p: BankParams) -> np.ndarray:
    """Landmarks for a mouth shape, starting from the closed-lip landmarks."""
    f = _frame(closed)
    out = closed.copy()
    drop = 0.85 * p.max_gap * f.mw * openness  # lower lip; the upper lip rises 0.15 gap
    side = 0.85 - 0.1 * width if width > 0 else 0.85 - 0.12 * width  # "oo" is rounder
    prof = np.array([side, 1.0, side])
    _shift_lips(out, f.d, -0.18 * drop * prof, drop * prof)
    out[[48, 54, 60, 64]] += 0.3 * drop * f.d
    out[JAW_MOVING] += np.outer(0.9 * JAW_WEIGHTS / JAW_WEIGHTS.max() * drop, f.d)
    # width: scale the lips about the mouth centre along u (corners move in/out);
    # an opening mouth also narrows a little
    scale = (0.2 * width if width > 0 else 0.3 * width) - 0.08 * openness
    along = (out[48:68] - f.center) @ f.u
    out[48:68] += np.outer(scale * along, f.u)
    if width < 0:  # rounded: protruding lips look fuller
        out[UPPER_OUTER_MID] -= 0.05 * f.mw * -width * f.d
        out[LOWER_OUTER_MID] += 0.05 * f.mw * -width * f.d
    else:  # wide: corners rise a little
        out[[48, 54, 60, 64]] -= 0.03 * f.mw * width * f.d
    return out


def edge_curves(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense inner-lip curves (upper, lower), left corner -> right corner, same sampling
    for any landmark set so source and target points correspond."""
    c0 = pts[48] + 0.2 * (pts[60] - pts[48])
    c1 = pts[54] + 0.2 * (pts[64] - pts[54])
    upper = smooth_curve(np.stack([c0, *pts[UPPER_INNER], c1]), CURVE_SAMPLES)
    lower = smooth_curve(np.stack([c0, *pts[LOWER_INNER], c1]), CURVE_SAMPLES)
    return upper, lower


def warp_mouth(
    image: np.ndarray,
    src: np.ndarray,
    curves: tuple[np.ndarray, np.ndarray],
    dst: np.ndarray,
    roi: Roi,
) -> np.ndarray:
    """Warp the mouth ROI so that landmarks `src` and the lip edge `curves` (in the photo)
    appear at `dst`."""
    f = _frame(dst)
    ext_dst = np.stack([dst[48] - 0.35 * f.mw * f.u, dst[54] + 0.35 * f.mw * f.u])
    ext_src = ext_dst + 0.5 * (src[[48, 54]] - dst[[48, 54]])  # cheeks follow the corners
    fixed = src[NOSE + JAW_FIXED]
    (su, sl), (du, dl) = curves, edge_curves(dst)
    upper_idx = [48, 49, 50, 51, 52, 53, 54]
    lower_idx = [48, 54, 55, 56, 57, 58, 59, *JAW_MOVING]
    fields = [
        roi_field(np.concatenate([dst[idx], dc, ext_dst, fixed]),
                  np.concatenate([src[idx], sc, ext_src, fixed]), roi)
        for idx, dc, sc in ((upper_idx, du, su), (lower_idx, dl, sl))
    ]  # fmt: skip
    off = np.array(roi[:2], np.float64)
    seam = np.concatenate([dst[[48]], (du + dl) / 2, dst[[54]]]) - off
    seam = seam[np.argsort(seam[:, 0])]
    wl = split_weight(seam, roi[2], roi[3])[..., None]
    xs = np.arange(roi[2])[None, :, None]
    inside = (xs >= seam[0, 0]) & (xs <= seam[-1, 0])  # hard switch along the seam
    outside = fields[0] * (1 - wl) + fields[1] * wl  # smooth blend over the cheeks
    upper = np.where(inside, fields[0], outside)
    lower = np.where(inside, fields[1], outside)
    patch = remap_split(image, roi, upper, lower, wl)
    _darken_seam(patch, seam)
    return patch


def _darken_seam(patch: np.ndarray, curve: np.ndarray, strength: float = 0.35) -> None:
    """A soft contact shadow along the lip seam."""
    a = np.zeros(patch.shape[:2], np.uint8)
    cv2.polylines(a, [np.round(curve * 8).astype(np.int32)], False, 255, 1, cv2.LINE_AA, 3)
    af = cv2.GaussianBlur(a.astype(np.float32) / 255, (0, 0), 0.6)[..., None]
    patch[:] = np.clip(patch * (1 - strength * af), 0, 255).astype(np.uint8)


def _soft_polygon(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    cv2.fillPoly(a, [np.round(poly * 8).astype(np.int32)], 255, cv2.LINE_AA, 3)
    return cv2.GaussianBlur(a.astype(np.float32) / 255, (0, 0), 0.7)


def _teeth_alpha(upper: np.ndarray, w: int, h: int, height: float) -> tuple[np.ndarray, ...]:
    """Alpha and shade of an upper-teeth band hanging `height` px below `upper`."""
    upper = upper[np.argsort(upper[:, 0])]
    xs = np.arange(w, dtype=np.float64)
    y_top = np.interp(xs, upper[:, 0], upper[:, 1])
    half = max(float(upper[-1, 0] - upper[0, 0]) / 2, 1.0)
    across = np.clip(1 - ((xs - (upper[0, 0] + upper[-1, 0]) / 2) / half) ** 2, 0, 1)
    band = height * (0.3 + 0.7 * across)
    rel = np.arange(h, dtype=np.float64)[:, None] - y_top[None, :]
    alpha = np.clip(band[None, :] - rel + 0.5, 0, 1) * np.clip(0.3 + across, 0, 1)[None, :]
    shade = (0.72 + 0.28 * across)[None, :] * (1 - 0.2 * np.clip(rel / (band + 1), 0, 1))
    return alpha, shade


def paint_cavity(patch: np.ndarray, dst: np.ndarray, roi: Roi) -> None:
    """Paint the inner mouth dark (darker toward the centre) with a hint of upper teeth."""
    f = _frame(dst)
    off = np.array(roi[:2], np.float64)
    upper, lower = (c - off for c in edge_curves(dst))
    h, w = patch.shape[:2]
    alpha = _soft_polygon((h, w), np.concatenate([upper, lower[::-1][1:-1]]))
    if alpha.max() < 1e-3:
        return
    depth = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    t = np.sqrt(depth / max(float(depth.max()), 1.0))[..., None]
    color = np.array([40, 45, 95.0]) * (1 - t) + np.array([18, 16, 38.0]) * t
    gap = float((dst[66] - dst[62]) @ f.d)
    teeth_a, shade = _teeth_alpha(upper, w, h, min(0.45 * gap, 0.11 * f.mw))
    ta = 0.9 * teeth_a[..., None]
    color = color * (1 - ta) + np.array([212, 226, 236.0]) * shade[..., None] * ta
    a = alpha[..., None]
    patch[:] = np.clip(patch * (1 - a) + color * a, 0, 255).astype(np.uint8)


def build_mouth_bank(image: np.ndarray, lm: np.ndarray, p: BankParams) -> PatchBank:
    """All (openness, width) mouth patches for one still image."""
    roi = mouth_roi(lm, image.shape)
    src = lm.astype(np.float64)
    curves = source_curves(image, src)
    src = lip_edges(src, curves)
    closed = closed_lips(src, p)
    x, y, w, h = roi
    patches = np.empty((p.n_open, p.n_width, h, w, 3), np.uint8)
    for i, o in enumerate(np.linspace(0, 1, p.n_open)):
        for j, wd in enumerate(np.linspace(-1, 1, p.n_width)):
            dst = mouth_targets(closed, float(o), float(wd), p)
            patch = warp_mouth(image, src, curves, dst, roi)
            paint_cavity(patch, dst, roi)
            patches[i, j] = patch
    return PatchBank(x, y, patches, feather_mask(w, h))
