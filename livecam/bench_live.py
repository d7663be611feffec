"""Live-pipeline benchmarks: measured mic-to-frame latency, and long runs under load.

Latency is measured, not assumed: a train of vowel-like bursts goes in through a file source
(paced like a microphone) or through a real PulseAudio input device, and the mouth's response
is detected in the frames the sink receives.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from livecam.audio import portaudio, pulse
from livecam.audio.virtual_mic import VirtualMic
from livecam.constants import SAMPLE_RATE
from livecam.live import LiveOptions, build_pipeline
from livecam.pipeline.runner import Pipeline

LEAD_S = 1.5  # silence first, so the noise floor settles


def burst_train(
    count: int = 15, period_s: float = 1.2, burst_s: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Vowel-like bursts (140 Hz harmonics shaped like an "ah") over faint noise."""
    rng = np.random.default_rng(seed)
    total = int((LEAD_S + count * period_s) * SAMPLE_RATE)
    audio = (0.001 * rng.standard_normal(total)).astype(np.float32)
    t = np.arange(int(burst_s * SAMPLE_RATE)) / SAMPLE_RATE
    harmonics = [(h * 140.0, 1.0 / (1 + abs(h * 140.0 - 800) / 300)) for h in range(1, 25)]
    burst = sum(a * np.sin(2 * np.pi * f * t) for f, a in harmonics)
    burst = (0.3 * burst / np.abs(burst).max() * np.hanning(len(t)) ** 0.2).astype(np.float32)
    onsets = [int((LEAD_S + i * period_s) * SAMPLE_RATE) for i in range(count)]
    for onset in onsets:
        audio[onset : onset + len(burst)] += burst
    return audio, onsets


class MouthProbe:
    """A sink wrapper that measures mouth motion in every frame it passes on."""

    def __init__(self, sink, rows: slice, cols: slice, neutral: np.ndarray) -> None:
        self.inner, self.rows, self.cols = sink, rows, cols
        self.neutral = neutral[rows, cols].astype(np.int16)
        self.name, self.latency_s = sink.name, sink.latency_s
        self.samples: list[tuple[float, float]] = []  # (send time, mouth motion)

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        region = frame[self.rows, self.cols].astype(np.int16)
        self.samples.append((time.monotonic(), float(np.abs(region - self.neutral).mean())))
        self.inner.send(frame, audio)

    def close(self) -> None:
        self.inner.close()


def attach_probe(pipeline: Pipeline) -> MouthProbe:
    x, y, w, h = pipeline.look.avatar.mouth_box()
    m = pipeline.compositor.transform(0)
    (x0, y0), (x1, y1) = (np.array([[x, y, 1], [x + w, y + 1.6 * h, 1]]) @ m.T).astype(int)
    neutral = pipeline.compositor.compose(pipeline.engine.generate_silent([0])[0], 0)
    probe = MouthProbe(pipeline.sink, slice(y0, y1), slice(x0, x1), neutral)
    pipeline.sink = probe
    return probe


def _responses(probe: MouthProbe, onset_times: list[float], sink_latency: float) -> list[float]:
    times = np.array([t for t, _ in probe.samples])
    motion = np.array([m for _, m in probe.samples])
    threshold = 0.25 * np.median(
        [motion[(times >= t) & (times < t + 0.6)].max() for t in onset_times]
    )
    latencies = []
    for t in onset_times:
        after = np.nonzero((times >= t) & (motion > threshold))[0]
        if len(after) and times[after[0]] < t + 1.0:
            latencies.append(times[after[0]] - t + sink_latency)
    return latencies


def _summary(latencies: list[float], expected: int, pipeline: Pipeline) -> dict:
    ms = np.array(latencies) * 1e3
    return {
        "bursts": expected,
        "detected": len(latencies),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 1),
            "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1),
        }
        if len(ms)
        else None,
        "estimated_ms": round(pipeline.latency_s() * 1e3, 1),
        "playout_delay_ms": round(pipeline.playout_delay * 1e3, 1),
    }


def _run_until_done(pipeline: Pipeline, seconds: float) -> None:
    pipeline.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not pipeline.finished():
            time.sleep(0.05)
            pipeline.source.poll()
    finally:
        pipeline.stop()


def latency_from_file(opts: LiveOptions, bursts: int = 15) -> dict:
    audio, onsets = burst_train(bursts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bursts.wav"
        sf.write(str(path), audio, SAMPLE_RATE)
        pipeline = build_pipeline(replace(opts, audio_file=path, sink="memory", idle_motion=False))
        probe = attach_probe(pipeline)
        _run_until_done(pipeline, len(audio) / SAMPLE_RATE + 5)
    origin = pipeline.clock.origin()
    onset_times = [origin + n / SAMPLE_RATE for n in onsets]
    return _summary(_responses(probe, onset_times, 0.0), len(onsets), pipeline)


@contextlib.contextmanager
def _pulse_pipeline(opts: LiveOptions, bursts: int) -> Iterator[tuple[Pipeline, MouthProbe, Any]]:
    """A pipeline whose microphone is a fresh PulseAudio null sink's monitor, a probe on its
    frames, and a function that plays the burst train into that sink."""
    audio, _ = burst_train(bursts)
    name = f"livecam_bench_{uuid.uuid4().hex[:6]}"
    modules = [
        pulse.pactl("load-module", "module-null-sink", f"sink_name={name}"),
        pulse.pactl("load-module", "module-remap-source", f"master={name}.monitor",
                    f"source_name={name}_mic"),
    ]  # fmt: skip
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            pulse.device_override("PULSE_SOURCE", f"{name}_mic"),
        ):
            path = Path(tmp) / "bursts.wav"
            sf.write(str(path), audio, SAMPLE_RATE)
            pipeline = build_pipeline(
                replace(opts, audio_file=None, mic=None, sink="memory", idle_motion=False)
            )

            def play() -> None:
                time.sleep(3.0)  # let the devices start delivering
                subprocess.run(["paplay", f"--device={name}", str(path)], check=True,
                               timeout=len(audio) / SAMPLE_RATE + 30)  # fmt: skip
                time.sleep(1.5)

            yield pipeline, attach_probe(pipeline), play
    finally:
        for module in reversed(modules):
            pulse.unload(module)


def latency_from_pulse(opts: LiveOptions, bursts: int = 15) -> dict:
    """Bursts played into a PulseAudio sink and captured through the real input device.
    Onsets are found in the captured audio; the device's reported input latency is added."""
    with _pulse_pipeline(opts, bursts) as (pipeline, probe, play):
        pipeline.start()
        try:
            first = pipeline.ring.end
            play()
        finally:
            pipeline.stop()
    start = max(first, pipeline.ring.start)
    found = _onsets(pipeline.ring.read(start, pipeline.ring.end), bursts)
    origin = pipeline.clock.origin() - pipeline.source.latency_s
    onset_times = [origin + (start + n) / SAMPLE_RATE for n in found]
    return _summary(_responses(probe, onset_times, 0.0), bursts, pipeline)


class _Recorder:
    """Captures one PulseAudio source with arrival times, to check what an app would hear."""

    def __init__(self, source: str) -> None:
        import sounddevice as sd

        self.blocks: list[tuple[float, np.ndarray]] = []
        with pulse.device_override("PULSE_SOURCE", source):
            stream = sd.InputStream(
                samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=160,
                latency="low", callback=self._callback,
            )  # fmt: skip
        self.stream = portaudio.track(stream)

    def _callback(self, indata, frames, time_info, status) -> None:
        self.blocks.append((time.monotonic(), indata[:, 0].copy()))

    def sample_times(self) -> tuple[np.ndarray, np.ndarray]:
        """All samples and the monotonic time at which each one reached the source."""
        latency = float(self.stream.latency)
        times = [t - latency - (len(b) - np.arange(len(b))) / SAMPLE_RATE for t, b in self.blocks]
        return np.concatenate([b for _, b in self.blocks]), np.concatenate(times)


def virtual_mic_offset(opts: LiveOptions, bursts: int = 15) -> dict:
    """Mouth onset in the frames minus speech onset on the LiveCam Microphone, per burst."""
    with _pulse_pipeline(opts, bursts) as (pipeline, probe, play):
        mic = VirtualMic(pipeline.ring, pipeline.clock, pipeline.audio_delay_s)
        pipeline.start()
        try:
            mic.start()
            recorder = _Recorder(mic.source)
            with recorder.stream:
                play()
        finally:
            mic.stop()
            pipeline.stop()
    heard, heard_at = recorder.sample_times()
    onset_times = [float(heard_at[n]) for n in _onsets(heard, bursts)]
    offsets = np.array(_responses(probe, onset_times, pipeline.sink.latency_s)) * 1e3
    return {
        "bursts": bursts,
        "detected": len(offsets),
        "offset_ms": {
            "p50": round(float(np.median(offsets)), 1),
            "max_abs": round(float(np.abs(offsets).max()), 1),
        }
        if len(offsets)
        else None,
        "audio_delay_ms": round(pipeline.audio_delay_s() * 1e3, 1),
    }


def _onsets(audio: np.ndarray, expected: int) -> list[int]:
    """Sample indices where the 5 ms energy first rises well above the quiet level."""
    hop = SAMPLE_RATE // 200
    energy = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = energy > 0.2 * np.percentile(energy, 99)
    starts = np.nonzero(loud[1:] & ~loud[:-1])[0] + 1
    kept: list[int] = []
    for s in starts:  # one onset per burst
        if not kept or s - kept[-1] > 100:
            kept.append(int(s))
    return [s * hop for s in kept[:expected]]


def soak(opts: LiveOptions, seconds: float) -> dict:
    """A long run on a looped speech clip: shown fps, mode, skips and latency per minute."""
    clip = opts.audio_file or Path(__file__).parent / "samples" / "jfk.wav"
    pipeline = build_pipeline(replace(opts, sink="memory", audio_file=clip, loop=True))
    minute: list[float] = []
    per_minute: list[dict] = []
    started = [0.0]

    def on_tick(index: int, now: float) -> None:
        minute.append(pipeline.clock.stream_time(now) - index / pipeline.cfg.fps)
        if now - started[0] >= 60.0:
            per_minute.append(_minute_summary(minute, now - started[0]))
            minute.clear()
            started[0] = now

    pipeline.on_tick = on_tick
    started[0] = time.monotonic()  # before the first tick, or it closes a "minute" at once
    pipeline.start()
    t0 = started[0]
    try:
        while time.monotonic() - t0 < seconds and pipeline.running:
            time.sleep(0.25)
            pipeline.source.poll()
        snap = pipeline.snapshot()
    finally:
        pipeline.stop()
    elapsed = time.monotonic() - t0
    if minute:
        per_minute.append(_minute_summary(minute, time.monotonic() - started[0]))
    growth = None
    whole = [m for m in per_minute if m["frames"] >= 0.9 * 60 * opts.fps]  # complete minutes
    if len(whole) >= 2:
        first, last = whole[0]["latency_p95_ms"], whole[-1]["latency_p95_ms"]
        growth = round((last - first) / first * 100, 2)
    return {
        "seconds": round(elapsed, 1),
        "simulated_load": opts.simulate_load,
        "target_fps": opts.fps,
        "shown_fps": round(snap.frames_shown / elapsed, 3),
        "generated_fps": round(snap.frames_generated / elapsed, 3),
        "skip_ratio": round(snap.skip_ratio, 4),
        "frames_repeated_late": snap.frames_repeated,
        "mode": {"tier": snap.tier, "stride": snap.stride, "batch": snap.batch},
        "playout_delay_ms": round(snap.playout_delay_ms, 1),
        "latency_p95_growth_percent": growth,
        "per_minute": per_minute,
    }


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _minute_summary(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1e3
    return {
        "rss_mb": round(_rss_bytes() / 2**20, 1),
        "frames": len(ms),
        "shown_fps": round(len(ms) / seconds, 3),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "latency_p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


def live_report(
    opts: LiveOptions, latency: bool, soak_seconds: float | None, bursts: int = 15
) -> dict:
    report: dict = {
        "engine": opts.engine,
        "avatar": opts.avatar,
        "size": f"{opts.width}x{opts.height}",
        "fps": opts.fps,
    }
    if latency:
        report["latency_file"] = latency_from_file(opts, bursts)
        running = pulse.available()
        missing = "PulseAudio is not running"
        report["latency_pulseaudio"] = latency_from_pulse(opts, bursts) if running else missing
        report["virtual_mic_sync"] = virtual_mic_offset(opts, bursts) if running else missing
    if soak_seconds:
        report["soak"] = soak(opts, soak_seconds)
    return report
