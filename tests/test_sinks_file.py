"""mp4 file sink through the real ffmpeg; checked with ffprobe."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from livecam.constants import SAMPLE_RATE
from livecam.sinks import SinkError
from livecam.sinks import file as file_sink
from livecam.sinks.file import FileSink

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffmpeg")

W, H, FPS = 160, 120, 30
N = 2 * FPS  # 2 s
ONSET = FPS  # sound and a bright background start at frame 30, i.e. t = 1 s


def frame(k: int) -> np.ndarray:
    """A moving bar; from ONSET on the background turns grey."""
    img = np.full((H, W, 3), 128 if k >= ONSET else 0, np.uint8)
    x = (4 * k) % (W - 10)
    img[:, x : x + 10] = (0, 255, 255)
    return img


def audio(k: int) -> np.ndarray:
    """Frame k's samples [k/FPS, (k+1)/FPS): empty before ONSET, a 440 Hz tone after."""
    if k < ONSET:
        return np.zeros(0, np.float32)  # the sink pads the gap with silence
    start, end = round(k * SAMPLE_RATE / FPS), round((k + 1) * SAMPLE_RATE / FPS)
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(start, end) / SAMPLE_RATE)).astype(np.float32)


def probe(path: Path) -> list[dict]:
    cmd = [
        "ffprobe", "-v", "error", "-count_frames", "-of", "json", "-show_entries",
        "stream=codec_type,codec_name,width,height,nb_read_frames,duration,start_time", str(path),
    ]  # fmt: skip
    return json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)["streams"]


def readable_frames(path: Path) -> int:
    try:
        return int(probe(path)[0]["nb_read_frames"])
    except (subprocess.CalledProcessError, IndexError, KeyError):
        return 0


def decoded_audio(path: Path) -> np.ndarray:
    cmd = ["ffmpeg", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar",
           str(SAMPLE_RATE), "pipe:1"]  # fmt: skip
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32)


def soundtrack() -> np.ndarray:
    """All the frames' audio, silence before ONSET included (what a render knows ahead)."""
    silence = np.zeros(round(ONSET * SAMPLE_RATE / FPS), np.float32)
    return np.concatenate([silence, *(audio(k) for k in range(ONSET, N))])


@pytest.mark.parametrize("one_pass", [False, True], ids=["muxed on close", "one pass"])
def test_writes_h264_and_aac_in_sync(tmp_path: Path, one_pass: bool) -> None:
    out = tmp_path / "clip.mp4"
    sink = FileSink(out, W, H, FPS, soundtrack() if one_pass else None)
    for k in range(N):
        sink.send(frame(k), audio(k))
    sink.close()
    sink.close()  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # temp files gone

    video, sound = sorted(probe(out), key=lambda s: s["codec_type"], reverse=True)
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", W, H)
    assert int(video["nb_read_frames"]) == N
    assert sound["codec_name"] == "aac"
    assert abs(float(video["duration"]) - float(sound["duration"])) <= 1 / FPS

    samples = decoded_audio(out)
    onset_s = np.argmax(np.abs(samples) > 0.1) / SAMPLE_RATE
    assert abs(onset_s - ONSET / FPS) < 1 / FPS
    cap = cv2.VideoCapture(str(out))
    means = [cap.read()[1][:, :60].mean() for _ in range(N)]
    assert int(np.argmax(np.array(means) > 64)) == ONSET


def test_a_frame_after_dropped_ticks_lasts_as_long_as_its_audio(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    sink = FileSink(out, W, H, FPS)
    for k in range(ONSET, N):
        if k in (ONSET + 11, ONSET + 12):
            continue  # two ticks dropped: the next frame brings their audio along
        sound = audio(k) if k != ONSET + 13 else np.concatenate([audio(j) for j in (41, 42, 43)])
        sink.send(frame(k), sound)
    sink.close()
    video, sound = sorted(probe(out), key=lambda s: s["codec_type"], reverse=True)
    assert int(video["nb_read_frames"]) == N - ONSET  # the held frame fills the dropped ticks
    assert abs(float(video["duration"]) - float(sound["duration"])) <= 1 / FPS


def test_killed_encoder_leaves_a_playable_file(tmp_path: Path) -> None:
    out, fps = tmp_path / "killed.mp4", 10  # a keyframe, so a fragment, every 20 frames
    sink = FileSink(out, W, H, fps)
    for k in range(45):
        sink.send(frame(k), audio(k))
    deadline = time.monotonic() + 5
    while readable_frames(sink._video_path) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for ffmpeg to write the first fragment
    sink._proc.kill()
    with pytest.raises(SinkError, match="ffmpeg failed"):
        sink.close()
    (video,) = probe(out)
    assert video["codec_name"] == "h264" and int(video["nb_read_frames"]) >= 20


def test_a_killed_one_pass_encoder_leaves_the_old_file_alone(tmp_path: Path) -> None:
    """A plain mp4 is unplayable until the encoder writes its end: nothing is published."""
    out = tmp_path / "render.mp4"
    out.write_bytes(b"an earlier render")
    sink = FileSink(out, W, H, FPS, soundtrack())
    for k in range(N):
        sink.send(frame(k), audio(k))
    sink._proc.kill()
    with pytest.raises(SinkError, match="ffmpeg failed"):
        sink.close()
    assert out.read_bytes() == b"an earlier render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]  # temp files gone


def test_failed_mux_keeps_the_video(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(file_sink, "AUDIO_BITRATE", "not-a-bitrate")
    out = tmp_path / "clip.mp4"
    sink = FileSink(out, W, H, FPS)
    for k in range(10):
        sink.send(frame(k), np.zeros(533, np.float32))
    with caplog.at_level(logging.ERROR):
        sink.close()
    assert "muxing audio" in caplog.text
    assert [s["codec_type"] for s in probe(out)] == ["video"]


def test_missing_folder_and_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SinkError, match=f"output folder {missing} does not exist"):
        FileSink(missing / "clip.mp4", W, H, FPS)
    with pytest.raises(SinkError, match="is a folder"):
        FileSink(tmp_path, W, H, FPS)
    with pytest.raises(SinkError, match="even width and height"):
        FileSink(tmp_path / "clip.mp4", W + 1, H, FPS)
    monkeypatch.setattr(file_sink.shutil, "which", lambda name: None)
    with pytest.raises(SinkError, match="sudo apt install ffmpeg"):
        FileSink(tmp_path / "clip.mp4", W, H, FPS)


def test_wrong_frame_and_send_after_close(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "clip.mp4", W, H, FPS)
    with pytest.raises(ValueError, match=r"frame must be a \(120, 160, 3\) uint8"):
        sink.send(np.zeros((H, W, 3), np.float32), audio(0))
    sink.send(frame(0), audio(0))
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.send(frame(1), audio(1))
