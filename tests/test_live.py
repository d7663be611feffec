"""The live pipeline with a file source: real pyvirtualcam, slow engines, stalls, shutdown."""

import gc
import io
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
from rich.console import Console

from livecam.audio.files import read_audio
from livecam.constants import SAMPLE_RATE
from livecam.live import LiveOptions, build_look, build_pipeline, run
from tests import fake_camera
from tests.conftest import JFK
from tests.helpers import probe, write_clip

FPS, WIDTH, HEIGHT = 30, 320, 240


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "clip.wav", read_audio(JFK)[: 3 * SAMPLE_RATE])


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
    # paced by the clock, never faster (load can only make it slower): the frames span the
    # 3 s of audio, and there is at most one frame per tick of that span
    span = cam.times[-1] - cam.times[0]
    assert span >= 3.0 - 1 / FPS
    assert len(frames) <= span * FPS + 2, len(frames) - span * FPS
    assert all(f.size == WIDTH * HEIGHT * 3 for f in frames)
    # the mouth moved: consecutive frames are not all alike
    distinct = {hash(f.tobytes()) for f in frames}
    assert len(distinct) > len(frames) / 2


def _run_pipeline(pipeline, seconds: float):
    with pipeline:  # started, and stopped however the block ends
        time.sleep(seconds)
        return pipeline.snapshot()


def test_factor_three_load_steps_down_and_every_tick_shows_a_frame(tmp_path):
    loop = write_clip(tmp_path / "loop.wav", read_audio(JFK))
    pipeline = build_pipeline(_options(loop, sink="memory", simulate_load=3.0, loop=True))
    latencies = []
    pipeline.on_tick = lambda index, now: latencies.append(
        pipeline.clock.stream_time(now) - index / FPS
    )
    snap = _run_pipeline(pipeline, 8.0)
    assert pipeline.counters.frames_shown == len(latencies)  # every tick showed a frame
    mode = pipeline.scheduler.mode
    assert mode.stride > 1 or mode.tier != "full"  # the scheduler stepped down
    assert snap.frames_generated * 2 < snap.frames_shown  # fewer mouths than frames shown
    assert snap.skip_ratio > 0.4
    # whether latency stays flat over minutes is a rate on a busy machine: measured by
    # `livecam bench --soak SECONDS --simulate-load 3` (latency_p95_growth_percent)


def test_avatar_switch_keeps_the_camera_running(tmp_path, fake_cam):
    opts = _options(write_clip(tmp_path / "loop.wav", read_audio(JFK)), loop=True)
    pipeline = build_pipeline(opts)
    old = pipeline.look
    pipeline.start()
    try:
        time.sleep(1.5)
        before, t0 = len(fake_cam[0].frames), time.monotonic()
        new = build_look(pipeline, "portrait", opts)  # loads and frames the other avatar
        pipeline.switch(new)
        during, took = len(fake_cam[0].frames) - before, time.monotonic() - t0
        time.sleep(1.5)
        snap = pipeline.snapshot()
    finally:
        pipeline.stop()
    (cam,) = fake_cam
    assert snap.avatar == "portrait" and snap.frames_generated > 0
    assert during > 0 or took < 3 / FPS  # frames kept going out while the avatar was built
    # each frame is nearer to one avatar's idle frame: astronaut, then portrait, one change
    refs = [look.compositor.compose(look.engine.generate_silent([0])[0], 0).astype(np.int16)
            for look in (old, new)]  # fmt: skip
    shape = (HEIGHT, WIDTH, 3)
    shows = [int(np.argmin([np.abs(f.reshape(shape) - r).mean() for r in refs]))
             for f in cam.frames]  # fmt: skip
    assert shows[0] == 0 and shows[-1] == 1
    assert np.count_nonzero(np.diff(shows)) == 1, shows


def test_switching_back_and_forth_frees_the_old_avatars(tmp_path):
    opts = _options(write_clip(tmp_path / "loop.wav", read_audio(JFK)), sink="memory", loop=True)
    pipeline = build_pipeline(opts)
    gone = [weakref.ref(pipeline.look)]
    pipeline.start()
    try:
        for name in ("portrait", "astronaut") * 4:
            pipeline.switch(build_look(pipeline, name, opts))
            gone.append(weakref.ref(pipeline.look))
            time.sleep(0.4)
        time.sleep(0.5)
    finally:
        pipeline.stop()
    gc.collect()
    assert [ref() is None for ref in gone] == [True] * (len(gone) - 1) + [False]


def test_stalled_audio_gives_idle_frames(clip):
    pipeline = build_pipeline(_options(clip, sink="memory"))
    pipeline.source.start = lambda: None  # the device opens but never delivers a block
    snap = _run_pipeline(pipeline, 1.5)
    assert snap.frames_generated == 0
    assert snap.frames_silent > 0 and snap.frames_shown > 0  # idle frames made and shown


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
    head = []  # wait until it runs (a loaded machine may take long to start), then 3 s more
    while "running:" not in "".join(head[-1:]) and (line := proc.stderr.readline()):
        head.append(line)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    stderr = "".join(head) + rest
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    streams = {s["codec_type"]: s for s in probe(out)["streams"]}
    assert set(streams) == {"video", "audio"}
    video_s, audio_s = float(streams["video"]["duration"]), float(streams["audio"]["duration"])
    assert video_s > 1.0
    assert abs(video_s - audio_s) < 0.15
