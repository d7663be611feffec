"""Real microphone capture: speech played into a PulseAudio null sink, captured by sounddevice."""

import subprocess
import time

import numpy as np

from livecam.live import LiveOptions, build_pipeline
from tests.conftest import JFK

FPS = 30


def test_microphone_drives_the_pipeline(pulse_mic):
    pipeline = build_pipeline(
        LiveOptions(
            avatar="astronaut", sink="memory", width=320, height=240, fps=FPS, dashboard=False
        )
    )
    levels = []
    pipeline.start()
    try:
        player = subprocess.Popen(["paplay", f"--device={pulse_mic}", str(JFK)])
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            time.sleep(0.1)
            pipeline.source.poll()
            levels.append(pipeline.source.stats.level_db)
        player.wait(timeout=10)
        snap = pipeline.snapshot()
    finally:
        pipeline.stop()
    assert pipeline.error is None
    assert snap.source != "" and pipeline.source.stats.blocks > 6 * 50  # 20 ms blocks
    assert max(levels) > -30  # the speech reached the microphone
    speech = pipeline.ring.read(pipeline.ring.end - 5 * 16000, pipeline.ring.end)
    assert np.sqrt(np.mean(speech**2)) > 0.01
    assert snap.frames_generated > 6 * FPS  # frames made from captured audio, not idle ones
    assert snap.frames_shown > 7 * FPS * 0.85
    assert pipeline.engine.features.hops_done > 0
    opened = [
        pipeline.engine.mouth(k)[0]
        for k in range(snap.frames_generated - 60, snap.frames_generated)
    ]
    assert max(opened) > 0 or max(levels) < -30
