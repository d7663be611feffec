"""The live pipeline with a file source: real pyvirtualcam, slow engines, stalls, shutdown."""

import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from rich.console import Console

from livecam.audio.files import read_audio
from livecam.constants import SAMPLE_RATE
from livecam.live import LiveOptions, build_pipeline, run
from tests import fake_camera
from tests.conftest import JFK
from tests.helpers import probe, write_clip

FPS, WIDTH, HEIGHT = 30, 320, 240


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "clip.wav", read_audio(JFK)[: 3 * SAMPLE_RATE])


@pytest.fixture
def fake_cam():
    fake_camera.register()
    fake_camera.FakeBackend.instances.clear()
    yield fake_camera.FakeBackend.instances


def _options(clip, **kw) -> LiveOptions:
    base = dict(
        avatar="astronaut",
        sink="virtualcam",
        camera_backend=fake_camera.FAKE,
        audio_file=clip,
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        dashboard=False,
    )
    return LiveOptions(**{**base, **kw})


def test_file_source_drives_the_virtual_camera(clip, fake_cam):
    assert run(_options(clip), Console(file=io.StringIO())) == 0
    (cam,) = fake_cam
    assert cam.closed and cam.width == WIDTH and cam.height == HEIGHT
    frames = cam.frames
    # 3 s of audio + the playout delay, at 30 fps
    assert 3.0 * FPS <= len(frames) <= 3.6 * FPS
    assert all(f.size == WIDTH * HEIGHT * 3 for f in frames)
    intervals = np.diff(cam.times)
    assert abs(np.median(intervals) - 1 / FPS) < 0.25 / FPS  # paced, not bursty
    # the mouth moved: consecutive frames are not all alike
    distinct = {hash(f.tobytes()) for f in frames}
    assert len(distinct) > len(frames) / 2


class SlowEngine:
    """Wraps an engine so each generate() takes `factor` frame budgets."""

    def __init__(self, engine, factor: float) -> None:
        self.inner, self.delay = engine, factor / FPS
        self.name, self.tier = engine.name, engine.tier

    def samples_needed(self, frame):
        return self.inner.samples_needed(frame)

    def generate(self, ring, frames):
        time.sleep(self.delay)
        return self.inner.generate(ring, frames)

    def generate_silent(self, frames):
        return self.inner.generate_silent(frames)


def _run_pipeline(pipeline, seconds: float):
    pipeline.start()
    try:
        time.sleep(seconds)
        return pipeline.snapshot()
    finally:
        pipeline.stop()


def test_slow_engine_never_stalls_the_camera(clip, fake_cam):
    pipeline = build_pipeline(_options(clip, sink="memory"))
    pipeline.engine = SlowEngine(pipeline.engine, factor=3)
    snap = _run_pipeline(pipeline, 2.5)
    assert snap.frames_shown >= 2.5 * FPS * 0.85  # the camera kept its rate
    assert snap.frames_skipped > snap.frames_generated  # the worker jumped ahead
    assert snap.frames_generated >= 2.5 * FPS / 3 * 0.6
    assert snap.repeat_ratio > 0.5
    assert snap.queue_depth <= snap.queue_capacity


def test_stalled_audio_gives_idle_frames(clip):
    pipeline = build_pipeline(_options(clip, sink="memory"))
    pipeline.source.start = lambda: None  # the device opens but never delivers a block
    snap = _run_pipeline(pipeline, 1.5)
    assert snap.frames_generated == 0
    assert snap.frames_silent > FPS  # idle frames were made and shown
    assert snap.frames_shown >= 1.5 * FPS * 0.85


def test_sigterm_leaves_a_playable_recording(tmp_path):
    out = tmp_path / "call.mp4"
    clip = write_clip(tmp_path / "long.wav", np.tile(read_audio(JFK), 2))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livecam",
            "start",
            "--audio",
            str(clip),
            "--sink",
            "file",
            "--out",
            str(out),
            "--size",
            f"{WIDTH}x{HEIGHT}",
            "--no-dashboard",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    streams = {s["codec_type"]: s for s in probe(out)["streams"]}
    assert set(streams) == {"video", "audio"}
    video_s, audio_s = float(streams["video"]["duration"]), float(streams["audio"]["duration"])
    assert video_s > 2.0
    assert abs(video_s - audio_s) < 0.15
