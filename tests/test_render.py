"""Offline render end to end: the CLI writes an mp4 whose mouth follows the speech."""

import subprocess
import sys

import numpy as np
import pytest

from livecam.audio.files import read_audio
from livecam.avatar.store import load_avatar
from livecam.constants import SAMPLE_RATE
from livecam.session import build_compositor, build_engine
from tests.conftest import JFK, SPEECH
from tests.helpers import loudness_per_frame, mouth_box_on_canvas, probe, read_frames

FPS, WIDTH, HEIGHT = 30, 640, 360


def _smooth(x: np.ndarray, n: int = 3) -> np.ndarray:
    return np.convolve(x, np.ones(n) / n, mode="same")


def _mouth_motion(frames: list[np.ndarray], avatar_name: str) -> np.ndarray:
    """Per frame: mean absolute difference from the closed-mouth frame in the mouth box."""
    avatar = load_avatar(avatar_name)
    engine = build_engine("lite", avatar, FPS)
    compositor = build_compositor(avatar, WIDTH, HEIGHT, FPS)
    rows, cols = mouth_box_on_canvas(avatar, compositor)
    motion = []
    for k, frame in enumerate(frames):
        neutral = compositor.compose(engine.generate_silent(range(k, k + 1))[0], k)
        diff = np.abs(frame[rows, cols].astype(np.float32) - neutral[rows, cols])
        motion.append(float(diff.mean()))
    return np.array(motion)


@pytest.mark.parametrize("clip", [JFK, SPEECH], ids=["jfk", "speech_en"])
@pytest.mark.parametrize("avatar", ["astronaut", "portrait"])
def test_render_mouth_follows_speech(tmp_path, clip, avatar):
    out = tmp_path / "clip.mp4"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "livecam",
            "render",
            "--avatar",
            avatar,
            "--audio",
            str(clip),
            "--out",
            str(out),
            "--fps",
            str(FPS),
            "--size",
            f"{WIDTH}x{HEIGHT}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    audio = read_audio(clip)
    duration = len(audio) / SAMPLE_RATE
    info = probe(out)
    kinds = sorted(s["codec_type"] for s in info["streams"])
    assert kinds == ["audio", "video"]
    assert abs(float(info["format"]["duration"]) - duration) < 0.1

    frames = read_frames(out)
    assert abs(len(frames) - duration * FPS) <= 1
    assert frames[0].shape == (HEIGHT, WIDTH, 3)
    motion = _mouth_motion(frames, avatar)
    loudness = loudness_per_frame(audio, FPS, len(frames))
    r = np.corrcoef(_smooth(motion), _smooth(loudness))[0, 1]
    assert r > 0.6, f"mouth motion correlates only {r:.2f} with loudness"
    if clip == SPEECH:  # 0.5 s of silence before the speech and 1 s after it
        silent = np.r_[0 : int(0.4 * FPS), len(frames) - int(0.8 * FPS) : len(frames)]
        speaking = loudness > 0.3 * loudness.max()
        # in silence only video-coding noise remains: small and constant, the mouth is still
        assert motion[silent].max() < 0.3 * motion[speaking].mean()
        assert np.ptp(motion[silent]) < 1.5


def test_render_tier_option(tmp_path):
    def render(tier: str) -> subprocess.CompletedProcess:
        args = ["render", "--audio", str(SPEECH), "--out", str(tmp_path / f"{tier}.mp4"),
                "--size", "320x240", "--no-idle", "--tier", tier]  # fmt: skip
        return subprocess.run([sys.executable, "-m", "livecam", *args], capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    assert render("full").returncode == 0 and render("nearest").returncode == 0
    full, nearest = read_frames(tmp_path / "full.mp4"), read_frames(tmp_path / "nearest.mp4")
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean()
             for a, b in zip(full, nearest, strict=True)]  # fmt: skip
    assert min(diffs) == 0  # silence: the same closed mouth in both tiers
    assert sum(d > 0.1 for d in diffs) > len(diffs) / 3  # speech: snapped, not blended shapes
    bad = render("ultra")
    assert bad.returncode == 2 and "unknown tier 'ultra'" in bad.stderr
