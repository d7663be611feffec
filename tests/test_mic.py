"""Real microphone capture: speech played into a null sink of a private PulseAudio or PipeWire
server (conftest), captured by sounddevice."""

import subprocess
import time

import numpy as np
import pytest

from livecam.live import LiveOptions, build_pipeline
from tests.conftest import JFK

FPS = 30


def _wait_for_audio(pipeline, timeout: float = 8.0) -> None:
    """PulseAudio's ALSA plugin sometimes takes seconds to deliver a new stream's first block;
    livecam reopens a silent device after 3 s, so audio must flow within a few seconds."""
    deadline = time.monotonic() + timeout
    while pipeline.source.stats.blocks < 10:
        assert time.monotonic() < deadline, "the microphone delivered no audio"
        time.sleep(0.05)
        pipeline.source.poll()


def test_microphone_drives_the_pipeline(pulse_mic):
    pipeline = build_pipeline(
        LiveOptions(
            avatar="astronaut", sink="memory", width=320, height=240, fps=FPS, dashboard=False
        )
    )
    levels, shown = [], []
    pipeline.on_tick = lambda index, now: shown.append(index)
    pipeline.start()
    try:
        _wait_for_audio(pipeline)
        before = pipeline.snapshot()
        blocks_before = pipeline.source.stats.blocks
        player = subprocess.Popen(["paplay", f"--device={pulse_mic}", str(JFK)])
        while player.poll() is None:
            time.sleep(0.1)
            pipeline.source.poll()
            levels.append(pipeline.source.stats.level_db)
        assert player.wait() == 0
        snap = pipeline.snapshot()
    finally:
        pipeline.stop()
    assert pipeline.error is None
    assert snap.source != "" and pipeline.source.stats.blocks > blocks_before
    assert max(levels) > -30  # the speech reached the microphone
    speech = pipeline.ring.read(pipeline.ring.end - 5 * 16000, pipeline.ring.end)
    assert np.sqrt(np.mean(speech**2)) > 0.01
    # every face while the speech played was made from captured audio, none was idle
    assert snap.frames_generated > before.frames_generated
    assert snap.frames_silent == before.frames_silent
    assert snap.frames_shown == snap.frames_new + snap.frames_held + snap.frames_repeated
    assert pipeline.engine.analysis.track.hops_done > 0
    # the mouth opened in frames that went on the camera (indices of the faces shown)
    recent = [k for k in shown[-5 * FPS :] if k >= 0]
    assert max(pipeline.engine.mouth(k)[0] for k in recent) > 0.2


def _watch(pipeline, seconds: float) -> list:
    snaps = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        pipeline.source.poll()
        snaps.append(pipeline.snapshot())
    return snaps


def test_suspended_microphone_gives_idle_frames_and_recovers(pulse_mic, sound_server):
    if sound_server == "pipewire":  # it suspends only idle nodes: the stream kept delivering
        pytest.skip("PipeWire ignores `pactl suspend-source` while a stream records from it")
    source = f"{pulse_mic}_mic"
    pipeline = build_pipeline(
        LiveOptions(avatar="astronaut", sink="memory", width=320, height=240, dashboard=False)
    )
    pipeline.start()
    try:
        _wait_for_audio(pipeline)
        subprocess.run(["pactl", "suspend-source", source, "1"], check=True, timeout=10)
        during = _watch(pipeline, 2.0)
        subprocess.run(["pactl", "suspend-source", source, "0"], check=True, timeout=10)
        after = _watch(pipeline, 2.0)
    finally:
        subprocess.run(["pactl", "suspend-source", source, "0"], timeout=10)
        pipeline.stop()
    assert any("delivered no audio" in w for w in during[-1].warnings), [
        (s.frames_generated, s.frames_silent, s.warnings) for s in during[::4]
    ]
    assert during[-1].frames_silent > during[0].frames_silent  # idle frames were made
    # the camera never stopped: frames went out in each half of the suspension
    half = len(during) // 2
    assert during[half].frames_shown > during[0].frames_shown
    assert during[-1].frames_shown > during[half].frames_shown
    assert after[-1].frames_generated > after[0].frames_generated  # audio flows again
    assert not after[-1].warnings
