"""The thin-plate-spline fields that shape the mouth and eyelid banks."""

from __future__ import annotations

import numpy as np

from livecam.avatar import warp


def test_control_points_under_a_pixel_apart_merge_into_the_first() -> None:
    roi = (10, 20, 40, 30)
    dst = np.array([[25.0, 30.0], [25.6, 30.4], [40.0, 40.0]])
    src = dst + np.array([[2.0, 1.0], [-3.0, 0.0], [0.0, -2.0]])
    merged = warp.roi_field(dst, src, roi)
    assert merged.shape == (30, 40, 2)
    assert np.array_equal(merged, warp.roi_field(dst[[0, 2]], src[[0, 2]], roi))
    apart = dst.copy()
    apart[1] = (26.5, 30.0)  # 1.5 px away: a control point of its own
    assert np.abs(warp.roi_field(apart, src, roi) - merged).max() > 1.0
    # the ROI's border is held still (at its anchors; between them it moves under 0.1 px,
    # invisible, while the control points move 2-3 px)
    border = np.concatenate([merged[0], merged[-1], merged[:, 0], merged[:, -1]])
    assert np.abs(border).max() < 0.1 < np.abs(merged).max()
