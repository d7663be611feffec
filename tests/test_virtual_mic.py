"""The LiveCam Microphone through PulseAudio: in step with the mouth, and cleaned up."""

import json
import subprocess
import sys

import pytest

from livecam.audio import pulse
from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.virtual_mic import SINK, SOURCE, VirtualMic
from livecam.bench_live import virtual_mic_offset
from livecam.live import LiveOptions

pytestmark = pytest.mark.usefixtures("pulse_mic")


def _names(kind: str) -> list[str]:
    return [line.split("\t")[1] for line in pulse.pactl("list", "short", kind).splitlines()]


def test_virtual_mic_is_in_step_with_the_mouth():
    result = virtual_mic_offset(LiveOptions(avatar="astronaut", dashboard=False), bursts=8)
    assert result["detected"] >= 7, result
    assert abs(result["offset_ms"]["p50"]) <= 33, result  # one frame at 30 fps
    assert result["offset_ms"]["max_abs"] <= 50
    assert SOURCE not in _names("sources") and SINK not in _names("sinks")  # removed on exit


def test_leftovers_of_a_crashed_run_are_replaced():
    for args in (
        ["module-null-sink", f"sink_name={SINK}"],
        ["module-remap-source", f"master={SINK}.monitor", f"source_name={SOURCE}"],
    ):
        pulse.pactl("load-module", *args)
    mic = VirtualMic(AudioRing(16000), AudioClock(), lambda: 0.1)
    mic.start()
    try:
        assert _names("sources").count(SOURCE) == 1 and _names("sinks").count(SINK) == 1
    finally:
        mic.stop()
    assert SOURCE not in _names("sources") and SINK not in _names("sinks")


def test_latency_bench_reports_measured_figures():
    out = subprocess.run(
        [sys.executable, "-m", "livecam", "bench", "--latency", "--bursts", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out)
    for key in ("latency_file", "latency_pulseaudio"):
        measured = report[key]
        assert measured["detected"] >= 4
        assert 0 < measured["latency_ms"]["p50"] <= measured["latency_ms"]["p95"] < 500
    assert report["virtual_mic_sync"]["detected"] >= 4
