"""Bad input: one clear line on stderr, a non-zero exit, no traceback."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.conftest import JFK
from tests.helpers import write_clip


def livecam(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "livecam", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_photo_without_a_face(tmp_path):
    photo = tmp_path / "wall.png"
    gradient = np.tile(np.linspace(40, 200, 400, dtype=np.uint8), (300, 1))
    cv2.imwrite(str(photo), cv2.merge([gradient] * 3))
    result = livecam("avatars", "prepare", "wall", "--from", str(photo))
    assert_clean_failure(result, "no face found in", str(photo))


def test_unreadable_photo(tmp_path):
    photo = tmp_path / "broken.jpg"
    photo.write_bytes(b"not an image")
    assert_clean_failure(livecam("avatars", "prepare", "x", "--from", str(photo)), str(photo))


def test_video_without_a_face(tmp_path):
    clip = tmp_path / "me.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:d=0.5",
                    str(clip)], check=True, timeout=60)  # fmt: skip
    result = livecam("avatars", "prepare", "me", "--from", str(clip))
    assert_clean_failure(result, "no face found in the first frame of", str(clip))


def test_unreadable_video(tmp_path):
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(b"not a video at all")
    result = livecam("avatars", "prepare", "me", "--from", str(clip))
    assert_clean_failure(result, "cannot read video", str(clip))


def test_unreadable_audio_file(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("these are not samples")
    result = livecam("render", "--audio", str(bad), "--out", str(tmp_path / "o.mp4"))
    assert_clean_failure(result, "cannot read audio from", str(bad))
    assert not (tmp_path / "o.mp4").exists()


def test_empty_audio_file(tmp_path):
    empty = write_clip(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    result = livecam("render", "--audio", str(empty), "--out", str(tmp_path / "o.mp4"))
    assert_clean_failure(result, "contains no samples")


def test_missing_audio_file(tmp_path):
    result = livecam("start", "--audio", str(tmp_path / "nope.wav"), "--sink", "memory")
    assert_clean_failure(result, "audio file not found")
    # told before an engine loads its weights (here there are none) or reaches its pool
    result = livecam("start", "--audio", str(tmp_path / "nope.wav"), "--sink", "memory",
                     "--engine", "musetalk", "--models-dir", str(tmp_path / "none"))  # fmt: skip
    assert_clean_failure(result, "audio file not found")


def test_missing_camera_device():
    result = livecam(
        "start",
        "--audio",
        str(JFK),
        "--sink",
        "virtualcam",
        "--camera",
        "/dev/video99",
        "--no-dashboard",
        "--duration",
        "1",
    )
    # livecam keeps running (the camera may appear: module loaded later) and says why
    out = " ".join((result.stdout + result.stderr).split())  # log lines are wrapped
    assert result.returncode == 0 and "Traceback" not in out
    assert "/dev/video99 does not exist" in out and "modprobe v4l2loopback" in out


def test_unknown_avatar():
    assert_clean_failure(
        livecam("render", "--avatar", "nobody", "--audio", str(JFK), "--out", "/tmp/x.mp4"),
        "nobody",
        "astronaut",
    )


@pytest.mark.usefixtures("pulse_mic")
def test_missing_microphone():
    result = livecam(
        "start",
        "--device",
        "no-such-microphone",
        "--sink",
        "memory",
        "--no-dashboard",
        "--duration",
        "1",
    )
    assert_clean_failure(result, "no microphone matches 'no-such-microphone'", "livecam devices")


# the CLI in a child whose sounddevice finds no PortAudio library, as where libportaudio2
# is not installed (sounddevice looks for it with ctypes.util.find_library)
WITHOUT_PORTAUDIO = """
import ctypes.util, sys
find = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if "portaudio" in name else find(name)
from livecam.cli import app
sys.argv[0] = "livecam"
app()
"""


def without_portaudio(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_PORTAUDIO, *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_missing_portaudio_library_names_the_package():
    fix = "sudo apt-get install libportaudio2"
    for args in (("start", "--sink", "memory", "--no-dashboard", "--duration", "1"),
                 ("devices",)):  # fmt: skip
        assert_clean_failure(without_portaudio(*args), "PortAudio library not found", fix)
    doctor = " ".join(without_portaudio("doctor").stdout.split())
    assert f"FAIL microphone: PortAudio library not found; the microphone needs it: {fix}" in doctor
    # an audio file needs no PortAudio
    played = without_portaudio("start", "--audio", str(JFK), "--sink", "memory",
                               "--no-dashboard", "--duration", "1")  # fmt: skip
    assert played.returncode == 0, played.stderr


def test_bad_size_option():
    result = livecam("render", "--audio", str(JFK), "--out", "/tmp/x.mp4", "--size", "big")
    assert result.returncode == 2 and "WIDTHxHEIGHT" in result.stderr + result.stdout


def test_doctor_names_the_fix_for_each_problem():
    result = livecam("doctor")
    assert "Traceback" not in result.stderr
    out = result.stdout
    for name in ("virtual camera", "microphone", "ffmpeg", "avatars", "musetalk weights"):
        assert name in out
    if "no v4l2loopback device" in out:  # no camera on this machine: says how to make one
        assert "modprobe v4l2loopback" in out
    assert "livecam models download" in out or "present in" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random-weights"], "--random-weights and --tiny go with --engine musetalk"),
        (["--engine", "musetalk", "--tiny"], "--tiny goes with --random-weights"),
    ],
)
def test_serve_random_weights_options_are_checked_before_ray_starts(tmp_path, args, message):
    result = livecam("serve", "--token-file", str(tmp_path / "token"), *args)
    assert_clean_failure(result, message)
    assert not (tmp_path / "token").exists()


def test_a_musetalk_pool_without_weights_here_is_refused_before_ray_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    result = livecam("serve", "--token-file", str(tmp_path / "token"), "--engine", "musetalk",
                     "--models-dir", str(tmp_path / "empty"))  # fmt: skip
    assert_clean_failure(result, f"MuseTalk weights missing in {tmp_path / 'empty'}")
    assert "livecam models download" in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # (its start-up says so)
