"""A still photo's idle sway warps only the head region: inside the head the frame is the
full-frame warp's, outside it the picture is drawn once, and the seam is feathered."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from livecam.avatar.store import load_avatar
from livecam.pipeline import compositor
from livecam.session import build_compositor


def _head_box(landmarks: np.ndarray, m: np.ndarray) -> tuple[slice, slice]:
    pts = np.c_[landmarks, np.ones(len(landmarks))] @ m.T
    (x0, y0), (x1, y1) = pts.min(axis=0).astype(int), pts.max(axis=0).astype(int)
    return slice(y0, y1), slice(x0, x1)


@pytest.mark.parametrize("name", ["astronaut", "portrait"])
def test_head_region_matches_the_full_frame_warp(name: str) -> None:
    avatar = load_avatar(name)
    comp = build_compositor(avatar, 1280, 720, 30)
    head = comp._head
    assert head is not None  # a still photo with idle motion takes the head-only path
    area = (head.x1 - head.x0) * (head.y1 - head.y0)
    assert area < 0.5 * (comp._x1 - comp._x0) * 720  # it is the smaller warp
    frames = [comp.compose(avatar.image, k) for k in range(0, 300, 23)]
    for k, got in zip(range(0, 300, 23), frames, strict=True):
        want = comp.compose_whole(avatar.image, k)
        box = _head_box(avatar.landmarks, comp.transform(k))
        diff = np.abs(got[box].astype(int) - want[box])
        assert diff.mean() < 1.0, (k, diff.mean())  # the bound: under one level
        outside = np.ones(got.shape[:2], bool)
        outside[head.y0 : head.y1, head.x0 : head.x1] = False
        assert np.array_equal(got[outside], head.still[outside])  # drawn once, unchanged
    moved = np.abs(frames[0][box].astype(int) - frames[5][box]).mean()
    assert moved > 1.0  # the head still sways


def test_the_seam_is_feathered_and_without_sway_the_frame_is_the_plain_warp() -> None:
    avatar = load_avatar("astronaut")
    comp = build_compositor(avatar, 1280, 720, 30)
    alpha = comp._head.alpha
    assert alpha.max() == 1.0 and 0.0 < alpha[alpha > 0].min() < 0.1
    inner = alpha[alpha.shape[0] // 2]
    assert np.all(np.diff(inner[: len(inner) // 2]) >= 0)  # rises smoothly towards the head
    still = build_compositor(avatar, 1280, 720, 30, idle_motion=False)
    talking = avatar.image.copy()
    talking[avatar.landmarks[48:, 1].astype(int), avatar.landmarks[48:, 0].astype(int)] = 255
    diff = np.abs(still.compose(talking, 7).astype(int) - still.compose_whole(talking, 7))
    assert diff.max() <= 1  # no sway: the head path is the plain warp, mouth changes included


@pytest.mark.parametrize("name", ["astronaut", "portrait"])
def test_only_the_fading_edge_is_blended(name: str) -> None:
    head = build_compositor(load_avatar(name), 1280, 720, 30)._head
    covered = np.zeros(head.alpha.shape, bool)
    for seam in head.seams:
        assert not covered[seam.rows, seam.cols].any()  # no pixel blended twice
        covered[seam.rows, seam.cols] = True
        alpha = head.alpha[seam.rows, seam.cols]
        assert np.array_equal(seam.alpha.reshape(*alpha.shape, 3), np.dstack([alpha] * 3))
        assert np.array_equal(seam.beta, 1.0 - seam.alpha)
    assert np.all(head.alpha[~covered] == 1.0)  # elsewhere the warped head is the frame
    assert covered.mean() < 0.3  # a 29 px ring around a ~500 px square


def test_no_seam_where_the_head_meets_the_canvas_edge() -> None:
    alpha = np.ones((10, 12), np.float32)
    alpha[:, :3] = np.float32([0.2, 0.5, 0.8])  # a rectangle that fades on its left only
    (seam,) = compositor._seams(alpha, 3, (False, False, True, False))
    assert (seam.rows, seam.cols) == (slice(0, 10), slice(0, 3))
    alpha[7:] = np.minimum(alpha[7:], np.float32([[0.9], [0.6], [0.3]]))  # and at the bottom
    seams = compositor._seams(alpha, 3, (False, True, True, False))
    assert [(s.rows, s.cols) for s in seams] == [
        (slice(7, 10), slice(0, 12)),
        (slice(0, 7), slice(0, 3)),
    ]


def _reused(comp: compositor.Compositor, image: np.ndarray, k: int) -> np.ndarray:
    """compose() into an earlier frame whose head region holds something else entirely."""
    out = comp.compose(image, k + 1)
    head = comp._head
    noise = np.random.default_rng(k).integers(0, 256, out.shape, np.uint8)
    out[head.y0 : head.y1, head.x0 : head.x1] = noise[head.y0 : head.y1, head.x0 : head.x1]
    got = comp.compose(image, k, out)
    assert got is out
    return got


@pytest.mark.parametrize("name", ["astronaut", "portrait"])
def test_a_reused_canvas_is_drawn_exactly_like_a_new_one(name: str) -> None:
    avatar = load_avatar(name)
    comp = build_compositor(avatar, 1280, 720, 30)
    for k in (0, 40, 170):
        assert np.array_equal(_reused(comp, avatar.image, k), comp.compose(avatar.image, k))
    noise = np.random.default_rng(3).integers(0, 256, (720, 1280, 3), np.uint8)
    want = comp.compose_whole(avatar.image, 9)  # the whole-photo path (video avatars)
    assert np.array_equal(comp.compose_whole(avatar.image, 9, noise), want)


def test_a_reused_canvas_is_redrawn_where_the_head_reaches_past_the_photo() -> None:
    image = np.random.default_rng(1).integers(0, 256, (200, 160, 3), np.uint8)
    framing = compositor.Framing((-40.0, 0.0, 240.0, 200.0), (80.0, 190.0), 120.0)
    comp = compositor.Compositor(image, framing, 320, 240, 30, head_box=(10, 20, 150, 180))
    head = comp._head
    assert head is not None and head._window(comp.transform(3), image.shape) is None
    assert np.array_equal(_reused(comp, image, 3), comp.compose(image, 3))


def _bgr_warp(comp: compositor.Compositor, image: np.ndarray, k: int, x0: int, y0: int,
              out: np.ndarray) -> np.ndarray:  # fmt: skip
    """OpenCV's own warp of the BGR image into `out` (canvas offset x0, y0), as it was."""
    m = comp.transform(k) - [[0, 0, x0], [0, 0, y0]]
    return cv2.warpAffine(image, m, out.shape[1::-1], dst=out, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_TRANSPARENT)  # fmt: skip


@pytest.mark.parametrize("name", ["astronaut", "portrait"])
def test_the_pixels_are_opencvs_bgr_warp_blended_by_alpha(name: str) -> None:
    avatar = load_avatar(name)
    comp = build_compositor(avatar, 1280, 720, 30)
    head = comp._head
    image = avatar.image.copy()
    image[::7] = 255 - image[::7]  # sharp detail, where any rounding would show
    rows, cols = slice(head.y0, head.y1), slice(head.x0, head.x1)
    still = head.still[rows, cols]
    for k in range(0, 600, 37):
        assert head._window(comp.transform(k), image.shape)  # the head is inside the photo
        warped = _bgr_warp(comp, image, k, head.x0, head.y0, still.copy())
        want = cv2.blendLinear(warped, still, head.alpha, 1.0 - head.alpha)  # all the region
        assert np.array_equal(comp.compose(image, k)[rows, cols], want), k
    whole = comp.backdrop.copy()  # and the whole-photo path (video avatars)
    x0, x1 = comp._x0, comp._x1
    _bgr_warp(comp, image, 5, x0, 0, whole[:, x0:x1])
    assert np.array_equal(comp.compose_whole(image, 5), whole)
