"""Avatars from a short clip: aligned frames, the head motion replayed, the mouth on top."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.landmarks import detect_face
from livecam.avatar.model import Avatar
from livecam.avatar.store import load_avatar, prepare_avatar
from livecam.session import build_compositor, build_engine
from tests.conftest import JFK, REPO
from tests.helpers import eye_distance

N_FRAMES, RATE = 40, 25


def known_motion(i: int, size: tuple[int, int]) -> np.ndarray:
    """3x3: how the head moves in clip frame i (a slow turn and sway)."""
    w, h = size
    t = i / RATE
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 2.5 * np.sin(2 * np.pi * t / 1.6), 1.0)
    m[0, 2] += 8 * np.sin(2 * np.pi * t / 1.6)
    m[1, 2] += 4 * np.cos(2 * np.pi * t / 1.6)
    return np.vstack([m, [0, 0, 1]])


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The astronaut photo, moved by known_motion, as an H.264 clip (480 px: kept as is)."""
    image = cv2.imread(str(REPO / "avatars" / "astronaut" / "astronaut.png"))
    image = cv2.resize(image, (480, 480), interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    path = tmp_path_factory.mktemp("clip") / "me.mp4"
    ffmpeg = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}",
         "-r", str(RATE), "-i", "-", "-c:v", "libx264", "-crf", "16", "-pix_fmt", "yuv420p",
         str(path)],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert ffmpeg.stdin is not None
    for i in range(N_FRAMES):
        moved = cv2.warpAffine(image, known_motion(i, (w, h))[:2], (w, h),
                               borderMode=cv2.BORDER_REFLECT)  # fmt: skip
        ffmpeg.stdin.write(moved.tobytes())
    ffmpeg.stdin.close()
    assert ffmpeg.wait(timeout=60) == 0
    return path


@pytest.fixture(scope="module")
def avatar(clip: Path) -> Avatar:
    return prepare_avatar("clip", clip)


def test_clip_is_aligned_and_its_motion_recovered(avatar: Avatar) -> None:
    assert avatar.is_video and avatar.frames is not None and avatar.motion is not None
    assert len(avatar.frames) == N_FRAMES == len(avatar.motion)
    h, w = avatar.image.shape[:2]
    points = np.c_[avatar.landmarks[[8, 30, 36, 45, 48, 54]], np.ones(6)]

    def moved(m: np.ndarray) -> np.ndarray:
        return points @ m.T

    first = np.vstack([avatar.motion[0], [0, 0, 1]])
    errors, travel = [], []
    for i in range(N_FRAMES):  # motion relative to the first frame: recorded vs made
        made = known_motion(i, (w, h)) @ np.linalg.inv(known_motion(0, (w, h)))
        found = np.vstack([avatar.motion[i], [0, 0, 1]]) @ np.linalg.inv(first)
        errors.append(np.abs(moved(made) - moved(found)).max())
        travel.append(np.abs(moved(made) - points).max())
    assert max(travel) > 6  # the head really moves in the clip
    assert np.mean(errors) < 1.0 and max(errors) < 2.0, (np.mean(errors), max(errors))
    # the aligned frames hold the face where the first frame has it (the mouth bank's place)
    for i in (10, 20, 30):
        found = detect_face(avatar.frames[i]).landmarks
        drift = np.linalg.norm(found[27:68] - avatar.landmarks[27:68], axis=1)
        assert drift.mean() < 1.0, (i, drift.mean())


def test_a_phone_clip_stored_sideways_is_turned_by_its_display_matrix(
    clip: Path, tmp_path: Path
) -> None:
    """Phones record sideways and say how to show it (the display matrix, ffmpeg's
    `rotate`): the avatar is upright, as players show the clip."""
    sideways, phone = tmp_path / "sideways.mp4", tmp_path / "phone.mp4"
    for args in (
        ["-i", str(clip), "-vf", "transpose=2", str(sideways)],  # stored turned left
        ["-i", str(sideways), "-c", "copy", "-metadata:s:v:0", "rotate=-90", str(phone)],
    ):
        subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=120)
    lm = prepare_avatar("phone", phone).landmarks
    eyes = lm[36:48].mean(axis=0)
    assert lm[48:68, 1].mean() - eyes[1] > 0.5 * eye_distance(lm)  # the mouth below the eyes


def test_cache_round_trip(avatar: Avatar) -> None:
    again = load_avatar("clip")
    assert again.frames is not None and avatar.frames is not None
    assert np.array_equal(again.frames, avatar.frames)
    assert np.array_equal(again.motion, avatar.motion)


def test_clip_plays_at_its_speed_forward_then_backward(avatar: Avatar) -> None:
    n = N_FRAMES
    assert avatar.clip_rate == RATE
    at = [k / RATE for k in (0, 1, n - 1, n, 2 * n - 3, 2 * n - 2)]
    assert [avatar.clip_index(t) for t in at] == [0, 1, n - 1, n - 2, 1, 0]
    # a 30 fps camera shows clip frame 25 one second in, not frame 30
    assert avatar.clip_index(30 / 30) == 25


def test_the_head_moves_and_the_mouth_follows_speech(avatar: Avatar) -> None:
    engine = build_engine("lite", avatar, RATE)
    compositor = build_compositor(avatar, 320, 240, RATE)
    audio = read_audio(JFK)
    ring = AudioRing(len(audio))
    ring.write(audio)
    frames = list(range(0, 250))
    speaking = engine.generate(ring, frames)
    silent = engine.generate_silent(frames)
    x, y, w, h = avatar.mouth_box()
    mouth = (slice(y - h, y + 2 * h), slice(x - w // 2, x + w + w // 2))
    moves = [np.abs(a[mouth].astype(int) - b[mouth].astype(int)).mean()
             for a, b in zip(speaking, silent, strict=True)]  # fmt: skip
    assert max(moves) > 10  # the mouth opens with the speech
    assert np.mean(moves) > 2
    # in silence the clip still plays: the head is somewhere else 10 frames later
    canvases = [compositor.compose(face, k) for k, face in zip(frames[:20], silent, strict=False)]
    assert np.abs(canvases[10].astype(int) - canvases[0].astype(int)).mean() > 2


def test_musetalk_on_a_clip(avatar: Avatar) -> None:
    from livecam.engines.musetalk.engine import MuseTalkOptions
    from tests.musetalk_tiny import tiny_models_dir

    engine = build_engine("musetalk", avatar, RATE, options=MuseTalkOptions(
        tiny_models_dir(), warmup=False))  # fmt: skip
    audio = read_audio(JFK)
    ring = AudioRing(len(audio))
    ring.write(audio)
    faces = engine.generate(ring, [70, 71])
    assert faces[0].shape == avatar.image.shape
    idle = engine.generate_silent([0, 10])
    assert np.abs(idle[0].astype(int) - idle[1].astype(int)).mean() > 1  # the clip plays
