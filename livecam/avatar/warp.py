"""Thin-plate-spline backward warps with a sharp split for lips and eyelids.

A smooth field cannot close an open mouth (the gap must shrink to nothing), so each
warp uses two fields: one for everything above a split curve (upper lip, upper lid)
and one below it (lower lip and jaw; the still eye). Inside the curve's x span the
switch is a hard edge (the lip seam or the lid margin); outside it the blend widens
so the cheeks stay smooth.
"""

from __future__ import annotations

import cv2
import numpy as np

GRID_STEP = 4  # fields are evaluated on a coarse grid and interpolated bilinearly

Roi = tuple[int, int, int, int]  # x, y, w, h in image coords


def _tps_kernel(d2: np.ndarray) -> np.ndarray:
    # U(r) = r^2 log r, written with r^2 to avoid a sqrt; U(0) = 0.
    return 0.5 * d2 * np.log(np.maximum(d2, 1e-12))


def tps_field(dst: np.ndarray, src: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Fit a TPS through control points (dst -> src - dst), evaluate on the grid xs x ys.

    Returns (len(ys), len(xs), 2) float64 displacements.
    """
    dst = np.asarray(dst, np.float64)
    disp = np.asarray(src, np.float64) - dst
    n = len(dst)
    k = _tps_kernel(((dst[:, None, :] - dst[None, :, :]) ** 2).sum(-1))
    p = np.hstack([np.ones((n, 1)), dst])
    a = np.zeros((n + 3, n + 3))
    a[:n, :n] = k + 1e-6 * np.eye(n)
    a[:n, n:] = p
    a[n:, :n] = p.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = disp
    coef = np.linalg.lstsq(a, rhs, rcond=None)[0]
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    kk = _tps_kernel(((pts[:, None, :] - dst[None, :, :]) ** 2).sum(-1))
    out = kk @ coef[:n] + coef[n] + pts @ coef[n + 1 :]
    return out.reshape(len(ys), len(xs), 2)


def _interp_matrix(n_out: int, step: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation from samples at 0, step, 2*step ..."""
    pos = np.arange(n_out) / step
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    t = pos - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] = 1 - t
    m[np.arange(n_out), i0 + 1] = t
    return m


def dense_field(dst: np.ndarray, src: np.ndarray, w: int, h: int) -> np.ndarray:
    """TPS displacement over an (h, w) ROI (control points in ROI coords): (h, w, 2)."""
    nx, ny = -(-(w - 1) // GRID_STEP) + 1, -(-(h - 1) // GRID_STEP) + 1
    xs, ys = np.arange(nx) * GRID_STEP, np.arange(ny) * GRID_STEP
    coarse = tps_field(dst, src, xs.astype(float), ys.astype(float))
    mx, my = _interp_matrix(w, GRID_STEP, nx), _interp_matrix(h, GRID_STEP, ny)
    return np.stack([my @ coarse[..., c] @ mx.T for c in range(2)], -1)


def split_weight(curve: np.ndarray, w: int, h: int, spread: float = 0.8) -> np.ndarray:
    """Weight of the lower field: a hard step below `curve` inside its x span.

    curve: (K, 2) points in ROI coords, sorted by x. Outside the span the step softens
    by `spread` pixels per pixel of distance, so the two fields meet smoothly.
    """
    xs = np.arange(w, dtype=np.float64)
    ysplit = np.interp(xs, curve[:, 0], curve[:, 1])
    outside = np.maximum(0.0, np.maximum(curve[0, 0] - xs, xs - curve[-1, 0]))
    soft = 0.5 + spread * outside
    d = (np.arange(h, dtype=np.float64)[:, None] - ysplit[None, :]) / soft[None, :]
    t = np.clip(0.5 + 0.5 * d, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def remap_roi(image: np.ndarray, roi: tuple[int, int, int, int], disp: np.ndarray) -> np.ndarray:
    """Backward-map the ROI: output pixel p samples image at p + disp(p)."""
    x, y, w, h = roi
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32) + x, np.arange(h, dtype=np.float32) + y)
    map_x = (gx + disp[..., 0]).astype(np.float32)
    map_y = (gy + disp[..., 1]).astype(np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def remap_split(
    image: np.ndarray, roi: Roi, upper: np.ndarray, lower: np.ndarray, weight: np.ndarray
) -> np.ndarray:
    """Remap with each field, then blend colours by `weight` (h, w, 1) of the lower one.

    Blending colours, not displacements: at a seam half-way displacements would sample
    the middle of the gap (teeth, the eye), while this keeps a clean anti-aliased edge.
    """
    a = remap_roi(image, roi, upper).astype(np.float32)
    b = remap_roi(image, roi, lower).astype(np.float32)
    return np.clip(a + (b - a) * weight + 0.5, 0, 255).astype(np.uint8)


def border_points(w: int, h: int, n: int = 6) -> np.ndarray:
    """Fixed anchors along the ROI border (ROI coords)."""
    t = np.linspace(0, 1, n + 1)[:-1]
    top = np.stack([t * (w - 1), np.zeros_like(t)], 1)
    right = np.stack([np.full_like(t, w - 1), t * (h - 1)], 1)
    bottom = np.stack([(1 - t) * (w - 1), np.full_like(t, h - 1)], 1)
    left = np.stack([np.zeros_like(t), (1 - t) * (h - 1)], 1)
    return np.concatenate([top, right, bottom, left])


def feather_mask(w: int, h: int, frac: float = 0.18) -> np.ndarray:
    """(h, w, 1) float32 alpha: 1 in the middle, smoothstep to 0 at the border."""

    def ramp(n: int) -> np.ndarray:
        edge = max(2.0, frac * n)
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) / edge
        t = np.clip(d, 0.0, 1.0)
        return t * t * (3 - 2 * t)

    return (ramp(h)[:, None] * ramp(w)[None, :])[..., None].astype(np.float32)


def clip_roi(x0: float, y0: float, x1: float, y1: float, shape: tuple[int, ...]) -> Roi:
    """Integer ROI covering [x0, x1] x [y0, y1], clipped to the image."""
    h, w = shape[:2]
    xa, ya = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    xb, yb = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    return xa, ya, xb - xa, yb - ya


def smooth_curve(pts: np.ndarray, n: int = 6) -> np.ndarray:
    """Catmull-Rom spline through pts (K, 2): n samples per segment, ends included."""
    p = np.concatenate([pts[:1], pts, pts[-1:]]).astype(np.float64)
    t = np.linspace(0, 1, n, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        cubic = (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + cubic))
    out.append(p[-2:-1])
    return np.concatenate(out)


def roi_field(dst: np.ndarray, src: np.ndarray, roi: Roi) -> np.ndarray:
    """Dense TPS displacement over the ROI for control points in image coords (dst -> src),
    with the ROI border held still. Control points closer than 1 px are merged."""
    x, y, w, h = roi
    off = np.array([x, y], np.float64)
    anchors = border_points(w, h)
    d_all = np.concatenate([dst - off, anchors])
    s_all = np.concatenate([src - off, anchors])
    gap = d_all[:, None, :] - d_all[None, :, :]
    apart = np.hypot(gap[..., 0], gap[..., 1]) > 1.0
    keep: list[int] = []
    for i in range(len(d_all)):  # in order: a point is merged into the first one kept near it
        if apart[i, keep].all():
            keep.append(i)
    return dense_field(d_all[keep], s_all[keep], w, h)
