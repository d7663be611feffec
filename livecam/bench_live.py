"""Live-pipeline benchmarks: measured mic-to-frame latency, and long runs under load.

Latency is measured, not assumed: a train of vowel-like bursts goes in through a file source
(paced like a microphone) or through a real PulseAudio/PipeWire input device, and the mouth's
response is detected in the frames the sink receives. Through a sound server each burst's
onset time is when the server played it into the microphone's null sink (the player's DAC
time), so the capture side's own latency figure is checked, never assumed.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from livecam.audio import portaudio, pulse
from livecam.audio.timing import host_delay
from livecam.audio.virtual_mic import VirtualMic
from livecam.constants import HOPS_PER_SECOND, SAMPLE_RATE
from livecam.limits import DEFAULT_BURSTS
from livecam.live import LiveOptions, build_pipeline
from livecam.pipeline.runner import Pipeline

LEAD_S = 1.5  # silence first, so the noise floor settles
PERIOD_S = 0.6  # a burst and its mouth are over well before the next one
# through a sound server the bursts start once the capture stream has settled and its estimate
# reads the one-second spans (timing.SETTLE_SPANS), as in a call past its first seconds
WARM_UP_S = 20.0
EARLY_S = 0.4  # a mouth opening this long before a sound still counts as its response


def response_cycle(fps: float) -> float:
    """Seconds after which the frame grid and the engines' 20 ms feature hops line up again
    (100 ms at 30 fps: 3 frames, 5 hops); one frame where they do not repeat together."""
    if float(fps).is_integer():
        return 1.0 / math.gcd(int(fps), HOPS_PER_SECOND)
    return 1.0 / fps


def burst_train(
    count: int, fps: float, period_s: float = PERIOD_S, burst_s: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Vowel-like bursts (140 Hz harmonics shaped like an "ah") over faint noise.

    A mouth can only move at a frame, and its features step in 20 ms hops, so a sound's
    latency depends on where it starts against both grids: a pattern that repeats every
    `response_cycle` (at 30 fps the three frames of a 100 ms cycle meet the hops differently,
    and where in the cycle the bursts land moved a run's p50 by 10 ms). Each burst starts
    1/count of that cycle later than the one before, so the bursts sample every position
    evenly and their median is the latency of speech, whose onsets fall anywhere. Between
    two positions the p50 still steps with where the frame grid falls, which a microphone
    leaves to chance: 5 ms from end to end with 15 bursts, 2.8 ms with 30."""
    cycle = response_cycle(fps)
    period_s = math.ceil(period_s / cycle - 1e-9) * cycle  # whole cycles between bursts
    rng = np.random.default_rng(seed)
    total = int((LEAD_S + count * period_s + cycle) * SAMPLE_RATE)
    audio = (0.001 * rng.standard_normal(total)).astype(np.float32)
    t = np.arange(int(burst_s * SAMPLE_RATE)) / SAMPLE_RATE
    harmonics = [(h * 140.0, 1.0 / (1 + abs(h * 140.0 - 800) / 300)) for h in range(1, 25)]
    burst = sum(a * np.sin(2 * np.pi * f * t) for f, a in harmonics)
    burst = (0.3 * burst / np.abs(burst).max() * np.hanning(len(t)) ** 0.2).astype(np.float32)
    starts = [LEAD_S + i * period_s + i / count * cycle for i in range(count)]
    onsets = [round(start * SAMPLE_RATE) for start in starts]
    for onset in onsets:
        audio[onset : onset + len(burst)] += burst
    return audio, onsets


class MouthProbe:
    """Measures mouth motion in every frame the pipeline sends (its on_frame hook)."""

    def __init__(self, rows: slice, cols: slice, neutral: np.ndarray) -> None:
        self.rows, self.cols = rows, cols
        self.neutral = neutral[rows, cols].astype(np.int16)
        self.samples: list[tuple[float, float]] = []  # (send time, mouth motion)

    def __call__(self, frame: np.ndarray) -> None:
        region = frame[self.rows, self.cols].astype(np.int16)
        self.samples.append((time.monotonic(), float(np.abs(region - self.neutral).mean())))


def attach_probe(pipeline: Pipeline) -> MouthProbe:
    x, y, w, h = pipeline.look.avatar.mouth_box()
    m = pipeline.compositor.transform(0)
    (x0, y0), (x1, y1) = (np.array([[x, y, 1], [x + w, y + 1.6 * h, 1]]) @ m.T).astype(int)
    neutral = pipeline.compositor.compose(pipeline.engine.generate_silent([0])[0], 0)
    probe = MouthProbe(slice(y0, y1), slice(x0, x1), neutral)
    pipeline.on_frame = probe
    return probe


def _responses(probe: MouthProbe, onset_times: list[float], sink_latency: float) -> list[float]:
    """Per burst: when the mouth opened (first frame crossing the threshold from below, from
    EARLY_S before the sound on, so a mouth that leads the sound shows as negative) minus
    the sound's onset, plus the sink's latency."""
    times = np.array([t for t, _ in probe.samples])
    motion = np.array([m for _, m in probe.samples])
    near_onsets = [motion[(times >= t - EARLY_S) & (times < t + 0.6)] for t in onset_times]
    peaks = [m.max() for m in near_onsets if len(m)]  # a burst with no frames: undetected
    if not peaks:
        return []
    threshold = 0.25 * np.median(peaks)
    opened = np.nonzero((motion[1:] > threshold) & (motion[:-1] <= threshold))[0] + 1
    latencies = []
    for t in onset_times:
        near = opened[(times[opened] >= t - EARLY_S) & (times[opened] < t + 1.0)]
        if len(near):
            latencies.append(times[near[0]] - t + sink_latency)
    return latencies


class EstimateLog:
    """The pipeline's latency estimate, read every 0.1 s while a measurement runs, so that
    each burst is compared with what the dashboard showed when it was played (a stream's
    capture latency can step mid-run, and the estimate follows it)."""

    INTERVAL_S = 0.1

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.samples: list[tuple[float, float]] = []  # (monotonic time, estimate in s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="estimate-log", daemon=True)

    def __enter__(self) -> EstimateLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self.samples.append((time.monotonic(), self.pipeline.latency_s()))

    def at(self, times: list[float]) -> float | None:
        """Median over `times` of the last estimate read before each; None before any."""
        stamps = np.array([t for t, _ in self.samples])
        read = [self.samples[i - 1][1] for i in np.searchsorted(stamps, times) if i > 0]
        return float(np.median(read)) if read else None


def _summary(
    latencies: list[float], expected: int, pipeline: Pipeline, estimated: float | None
) -> dict:
    """`estimated` is the dashboard's estimate while the bursts played (`EstimateLog.at`);
    without one, its value at the end."""
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
        "estimated_ms": round((pipeline.latency_s() if estimated is None else estimated) * 1e3, 1),
        "playout_delay_ms": round(pipeline.playout_delay * 1e3, 1),
        "send_lag_ms": round(pipeline.send_lag_s * 1e3, 1),  # frames to the sink after due
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


def latency_from_file(opts: LiveOptions, bursts: int = DEFAULT_BURSTS) -> dict:
    audio, onsets = burst_train(bursts, opts.fps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bursts.wav"
        sf.write(str(path), audio, SAMPLE_RATE)
        pipeline = build_pipeline(replace(opts, audio_file=path, sink="memory", idle_motion=False))
        probe = attach_probe(pipeline)
        with EstimateLog(pipeline) as estimates:
            _run_until_done(pipeline, len(audio) / SAMPLE_RATE + 5)
    origin = pipeline.clock.origin()
    onset_times = [origin + n / SAMPLE_RATE for n in onsets]
    latencies = _responses(probe, onset_times, 0.0)
    return _summary(latencies, len(onsets), pipeline, estimates.at(onset_times))


@contextlib.contextmanager
def _pulse_pipeline(
    opts: LiveOptions, bursts: int
) -> Iterator[tuple[Pipeline, MouthProbe, _Player]]:
    """A pipeline whose microphone is a fresh null sink's monitor, a probe on its frames, and
    a player that speaks the burst train into that sink."""
    audio, onsets = burst_train(bursts, opts.fps)
    name = f"livecam_bench_{uuid.uuid4().hex[:6]}"
    modules = pulse.create_fed_source(name, f"{name}_mic")
    try:
        with pulse.device_override("PULSE_SOURCE", f"{name}_mic"):
            pipeline = build_pipeline(
                replace(opts, audio_file=None, mic=None, sink="memory", idle_motion=False)
            )
            yield pipeline, attach_probe(pipeline), _Player(name, audio, onsets)
    finally:
        pulse.unload_all(modules)


Block = tuple[int, int, float, float | None]  # first sample, frames, arrival, host delay


def _times_of(blocks: list[Block], samples: list[int], latency: float, playback: bool):
    """The monotonic time at which each sample met the sound card: the stream's callback clock
    within a quarter second of it, which keeps time to 0.6 ms and follows an underrun (one
    further off does not count), moved by the host delay the stream reports over its second
    half. PipeWire's delay figures wander by up to 15 ms over a new stream's first 10 s, so
    the early samples' own stamps would be that far off; PulseAudio's playback stamps hold
    steady either way. With no host timing: the earliest arrival moved by the latency."""
    delays = [delay for *_, delay in blocks[len(blocks) // 2 :] if delay is not None]
    settled = float(np.median(delays)) if delays else None
    sign = 1.0 if playback else -1.0
    found = []
    for sample in samples:
        near = [b for b in blocks if abs(b[0] - sample) <= SAMPLE_RATE // 4]
        if settled is not None:
            clock = np.median([arrival - first / SAMPLE_RATE for first, _, arrival, _ in near])
            origin = float(clock) + sign * settled
        else:
            earliest = min(arrival - (first + frames) / SAMPLE_RATE
                           for first, frames, arrival, _ in near)  # fmt: skip
            origin = earliest + sign * latency
        found.append(origin + sample / SAMPLE_RATE)
    return found


class _Player:
    """Plays audio into a PulseAudio/PipeWire sink and notes when each block is heard there
    (PortAudio's DAC time): the moment the sound reaches the null sink's monitor, i.e. the
    microphone, independent of how the capture side reports its own latency."""

    def __init__(self, sink: str, audio: np.ndarray, onsets: list[int]) -> None:

        self.audio, self.onsets = audio, onsets
        self.blocks: list[Block] = []
        self._pos = 0
        self._done = threading.Event()
        self.stream = portaudio.open_stream(self._callback, playback=True, pulse_device=sink)

    def _callback(self, outdata, frames, time_info, status) -> None:
        chunk = self.audio[self._pos : self._pos + frames]
        outdata[: len(chunk), 0] = chunk
        outdata[len(chunk) :, 0] = 0.0
        delay = host_delay(time_info.currentTime, time_info.outputBufferDacTime, playback=True)
        self.blocks.append((self._pos, frames, time.monotonic(), delay))
        self._pos += frames
        if self._pos >= len(self.audio):
            self._done.set()

    def play(self) -> None:
        time.sleep(WARM_UP_S)
        with self.stream:
            self._done.wait(timeout=len(self.audio) / SAMPLE_RATE + 30)
            time.sleep(1.5)  # the last burst's frames

    def onset_times(self) -> list[float]:
        return _times_of(self.blocks, self.onsets, float(self.stream.latency), playback=True)


def latency_from_pulse(opts: LiveOptions, bursts: int = DEFAULT_BURSTS) -> dict:
    """Bursts played into a PulseAudio/PipeWire sink and captured through the real input
    device; each onset's time is when the sink played it (the player's DAC time)."""
    with _pulse_pipeline(opts, bursts) as (pipeline, probe, player):
        pipeline.start()
        try:
            first = pipeline.ring.end
            with EstimateLog(pipeline) as estimates:
                player.play()
        finally:
            pipeline.stop()
    played = player.onset_times()
    summary = _summary(_responses(probe, played, 0.0), bursts, pipeline, estimates.at(played))
    # the capture on its own: where the pipeline's clock put each onset, minus when it played
    start = max(first, pipeline.ring.start)
    found = _heard_onsets(pipeline.ring.read(start, pipeline.ring.end), player)
    clocked = [pipeline.clock.origin() + (start + n) / SAMPLE_RATE for n in found]
    late = [c - min(played, key=lambda p, c=c: abs(c - p)) for c in clocked]
    capture, basis = pipeline.source.measured_latency()
    summary["capture_ms"] = {
        "measured": round(capture * 1e3, 1),  # what the estimate uses
        "basis": basis,
        "loopback_p50": round(float(np.median(late)) * 1e3, 1) if late else None,
        "requested": round(pipeline.source.stats.requested_latency_s * 1e3, 1),
        "reported": round(pipeline.source.stats.granted_latency_s * 1e3, 1),
    }
    return summary


class _Recorder:
    """Captures one PulseAudio source with its timing, to check what an app would hear."""

    def __init__(self, source: str) -> None:

        self.chunks: list[np.ndarray] = []
        self.blocks: list[Block] = []
        self._end = 0
        self.stream = portaudio.open_stream(self._callback, playback=False, pulse_device=source)

    def _callback(self, indata, frames, time_info, status) -> None:
        delay = host_delay(time_info.currentTime, time_info.inputBufferAdcTime)
        self.blocks.append((self._end, frames, time.monotonic(), delay))
        self.chunks.append(indata[:, 0].copy())
        self._end += frames

    def heard(self) -> np.ndarray:
        return np.concatenate(self.chunks)

    def times(self, samples: list[int]) -> list[float]:
        """When each sample was at the source (its ADC time)."""
        return _times_of(self.blocks, samples, float(self.stream.latency), playback=False)


def virtual_mic_offset(opts: LiveOptions, bursts: int = DEFAULT_BURSTS) -> dict:
    """Mouth onset in the frames minus speech onset on the LiveCam Microphone, per burst."""
    with _pulse_pipeline(opts, bursts) as (pipeline, probe, player):
        mic = VirtualMic(pipeline.ring, pipeline.clock, pipeline.audio_delay_s)
        pipeline.start()
        try:
            mic.start()
            recorder = _Recorder(mic.source)
            with recorder.stream:
                player.play()
        finally:
            mic.stop()
            pipeline.stop()
    onset_times = recorder.times(_heard_onsets(recorder.heard(), player))
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
    """Sample indices where the 1 ms energy first rises well above the quiet level (a few
    milliseconds into each burst: see `_heard_onsets`)."""
    hop = SAMPLE_RATE // 1000
    energy = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = energy > 0.2 * np.percentile(energy, 99)
    starts = np.nonzero(loud[1:] & ~loud[:-1])[0] + 1
    kept: list[int] = []
    for s in starts:  # one onset per burst
        if not kept or s - kept[-1] > 500:  # 0.5 s
            kept.append(int(s))
    return [s * hop for s in kept[:expected]]


def _heard_onsets(audio: np.ndarray, player: _Player) -> list[int]:
    """Where the player's bursts start in audio that went through the sound server: the
    detector's crossings, moved back by how late it crosses on the clean bursts (6-7 ms:
    the burst's first millisecond is quieter than the threshold), so that an onset heard
    and an onset played are compared like with like."""
    clean = np.array(_onsets(player.audio, len(player.onsets))) - np.array(player.onsets)
    lateness = int(np.median(clean))
    return [n - lateness for n in _onsets(audio, len(player.onsets))]


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
    opts: LiveOptions, latency: bool, soak_seconds: float | None, bursts: int = DEFAULT_BURSTS
) -> dict:
    report: dict = {
        "engine": opts.engine,
        "avatar": opts.avatar,
        "size": f"{opts.width}x{opts.height}",
        "fps": opts.fps,
    }
    if latency:
        report["latency_file"] = latency_from_file(opts, bursts)
        server = pulse.server_kind()  # measured through the one that runs; the other says so
        for kind in pulse.SERVERS:
            if server is None:
                report[f"latency_{kind}"] = "no PulseAudio or PipeWire server answers"
            elif kind != server:
                report[f"latency_{kind}"] = f"not the running server ({server} is)"
            else:
                report[f"latency_{kind}"] = latency_from_pulse(opts, bursts)
        report["virtual_mic_sync"] = (
            {"server": server, **virtual_mic_offset(opts, bursts)}
            if server
            else "no PulseAudio or PipeWire server answers"
        )
    if soak_seconds:
        report["soak"] = soak(opts, soak_seconds)
    return report
