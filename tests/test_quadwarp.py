"""QuadWarp warps BGR through BGRA: pixel for pixel what cv2.warpAffine gives for BGR."""

from __future__ import annotations

import cv2
import numpy as np

from livecam.pipeline.quadwarp import QuadWarp


def test_same_pixels_as_the_bgr_warp_and_no_state_between_calls() -> None:
    rng = np.random.default_rng(4)
    quad = QuadWarp()
    for i in range(20):
        image = rng.integers(0, 256, (90 + i, 120, 3), np.uint8)
        angle, scale = rng.uniform(-3, 3), rng.uniform(0.8, 1.6)
        m = cv2.getRotationMatrix2D((60.0, 45.0), angle, scale)
        m[:, 2] += rng.uniform(-2, 2, 2) - (30, 20)  # look at the middle of the image
        out = rng.integers(0, 256, (40, 50, 3), np.uint8)  # stale content is replaced
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [50, 0, 1], [0, 40, 1], [50, 40, 1]]) @ inv.T
        (x0, y0), (x1, y1) = np.floor(corners.min(0)), np.ceil(corners.max(0))
        assert x0 >= 1 and y0 >= 1 and x1 <= 117 and y1 <= 87 + i  # inside the image
        window = slice(int(y0) - 1, int(y1) + 3), slice(int(x0) - 1, int(x1) + 3)
        quad.warp(image, m, out, window)
        want = cv2.warpAffine(image, m, (50, 40), flags=cv2.INTER_LINEAR)
        assert np.array_equal(out, want), i


def test_where_the_image_does_not_reach_the_destination_stays() -> None:
    rng = np.random.default_rng(5)
    quad = QuadWarp()
    for i in range(20):
        image = rng.integers(0, 256, (60 + i, 80, 3), np.uint8)
        m = cv2.getRotationMatrix2D((40.0, 30.0), rng.uniform(-20, 20), rng.uniform(0.5, 2.0))
        m[:, 2] += rng.uniform(-30, 30, 2)  # the image covers part of the destination
        out = rng.integers(0, 256, (70, 90, 3), np.uint8)
        want = out.copy()
        cv2.warpAffine(image, m, (90, 70), dst=want, flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_TRANSPARENT)  # fmt: skip
        quad.warp(image, m, out)
        assert np.array_equal(out, want), i
