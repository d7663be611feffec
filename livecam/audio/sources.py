"""Audio sources that fill an AudioRing: a live microphone, or a file paced in real time."""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np

from livecam.audio import portaudio, pulse
from livecam.audio.clock import AudioClock
from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.audio.timing import CaptureTiming, host_delay
from livecam.audio.virtual_mic import source_name as own_source
from livecam.constants import BLOCK, SAMPLE_RATE

log = logging.getLogger(__name__)

CAPTURE_TAG = "livecam.capture"  # the stream property that finds the capture on the server
_capture_ids = itertools.count()

REQUESTED_LATENCY_S = BLOCK / SAMPLE_RATE  # asked of the server: one block; it may grant more
STALL_S = 1.0  # no audio for this long: tell the user the device stopped
REOPEN_S = 3.0  # no audio for this long: close and reopen the device (then every RETRY_S)
RETRY_S = 2.0
GAP_FILL_S = 0.5  # delivery this far behind the clock resumed after a gap: fill with silence
CHECK_TIMEOUT_S = 1.0  # asking the sound server where the capture goes, while capturing


class AudioDeviceError(Exception):
    """No usable microphone, with a message fit for the user."""


class NoMicrophone(AudioDeviceError):
    """PortAudio lists no input device at all: none is plugged in, or no sound server runs."""


LOOKING = f"looking again every {RETRY_S:.0f} s"
WAITING = f"no microphone found (plug one in, or start PulseAudio or PipeWire); {LOOKING}"


@dataclass
class SourceStats:
    blocks: int = 0
    overruns: int = 0  # blocks the sound card reported as overflowed (samples lost)
    level_db: float = -120.0  # RMS level of the newest block, dBFS
    problem: str = ""  # why audio is not flowing right now, empty when fine
    requested_latency_s: float = 0.0  # input latency asked of the device
    granted_latency_s: float = 0.0  # what the device (PortAudio) says it gives


def _db(block: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(block * block)) + 1e-12)


def deliver(ring: AudioRing, clock: AudioClock, block: np.ndarray, now: float) -> None:
    """Append a captured block. A gap in delivery (a stalled or slow-starting device) becomes
    silence, so sample numbers keep matching wall time and lip sync survives the gap."""
    if clock.started:
        behind = (now - clock.origin()) * SAMPLE_RATE - (ring.end + len(block))
        if behind > GAP_FILL_S * SAMPLE_RATE:
            ring.write_silence(int(behind))
    ring.write(block)
    clock.on_block(ring.end, now)


def input_devices() -> list[dict]:
    """PortAudio input devices as dicts with index, name, channels, default_samplerate."""
    sd = portaudio.load()

    found = []
    for index, dev in enumerate(sd.query_devices()):
        if dev["max_input_channels"] > 0:
            found.append(
                {
                    "index": index,
                    "name": dev["name"],
                    "channels": dev["max_input_channels"],
                    "default_samplerate": dev["default_samplerate"],
                }
            )
    return found


def resolve_input_device(spec: str | None) -> tuple[int | None, str]:
    """Pick an input device by index or by (part of) its name; None means the default.
    A device PortAudio does not list yet (a sound server or a microphone that came later)
    is looked for again after a rescan."""
    with portaudio.exclusive():  # another thread's rescan would pull the list from under it
        devices = input_devices()
        found = _pick_input(devices, spec)
        if found is None and portaudio.rescan():
            devices = input_devices()
            found = _pick_input(devices, spec)
    if found is not None:
        return found
    if not devices:
        raise NoMicrophone(
            "no microphone found: PortAudio sees no input device. Plug one in, or check that "
            "PulseAudio/PipeWire is running (`pactl list short sources`)."
        )
    names = ", ".join(f"{d['index']}: {d['name']}" for d in devices)
    raise AudioDeviceError(
        f"no microphone matches {spec!r}. Available inputs: {names}. "
        "List them with `livecam devices`."
    )


def _pick_input(devices: list[dict], spec: str | None) -> tuple[int, str] | None:
    sd = portaudio.load()

    if not devices:
        return None
    if spec is None:
        try:
            index = sd.default.device[0]
            if index is None or index < 0:
                index = sd.query_devices(kind="input")["index"]
        except Exception:
            index = devices[0]["index"]
        match = [d for d in devices if d["index"] == index] or devices[:1]
    else:
        match = [d for d in devices if spec.isdigit() and d["index"] == int(spec)]
        match = match or [d for d in devices if spec.lower() in d["name"].lower()]
    return (match[0]["index"], match[0]["name"]) if match else None


class AudioSource(Protocol):
    """What the pipeline needs of an audio source (microphone or file)."""

    name: str
    latency_s: float
    finished: bool
    stats: SourceStats

    def measured_latency(self) -> tuple[float, str]: ...
    def start(self) -> None: ...
    def poll(self) -> None: ...
    def stop(self) -> None: ...


class MicSource:
    """Captures the microphone with a sounddevice callback that only copies into the ring.

    With no input device at all (none plugged in yet, the sound server not up yet) it waits
    for one, looking every RETRY_S; the camera shows idle frames meanwhile.

    Through a sound server its stream carries a tag (CAPTURE_TAG). While livecam publishes
    its virtual microphone (`avoid_own_output`), the stream is looked up every RETRY_S: a
    server moves a stream to a new default source by itself, and where that is the virtual
    microphone (made the default by the user, or by the server where no other microphone
    exists) livecam would capture its own output; it is moved back.

    Its `latency_s` is measured: how long after a sound the clock's time for it (origin + n /
    rate) passes, from the host's ADC timestamps (see timing.py) or, without them, from how
    irregularly blocks arrive; the device's own figure only until either is known.
    """

    def __init__(
        self,
        ring: AudioRing,
        clock: AudioClock,
        device: str | None = None,
        avoid_own_output: bool = False,  # livecam publishes its virtual microphone
    ) -> None:
        self.ring, self.clock = ring, clock
        self.avoid_own_output = avoid_own_output
        self.stats = SourceStats(requested_latency_s=REQUESTED_LATENCY_S)
        self.finished = False  # a microphone never runs out
        self._stream = None
        self._timing = CaptureTiming()
        self._last_block = time.monotonic()
        self._next_retry = 0.0
        self._stalled_since: float | None = None  # the last block before a stall
        self._blocks_at_stall = 0
        self._blocks_at_start = 0  # a stream that has not delivered yet gets REOPEN_S
        self._wanted = device  # looked for again while no device is found
        self._tag = f"{os.getpid()}.{next(_capture_ids)}"  # its stream's, on a sound server
        self._captured_from = ""  # the sound server's source it was last seen on
        self._next_check = 0.0
        self.device_index: int | None = None  # None: waiting for a device
        self.name = "none"
        try:
            self.device_index, self.name = resolve_input_device(device)
        except NoMicrophone:  # said when the pipeline starts, not where a later check fails
            self.stats.problem, self._next_retry = WAITING, self._last_block + RETRY_S

    def measured_latency(self) -> tuple[float, str]:
        """(seconds, how they were found): "timestamps" ("timestamps, settling" in a stream's
        first SETTLE_SPANS seconds), "arrival jitter" or "reported"."""
        origin = self._timing.origin() if self.clock.started else None
        if origin is not None:
            basis = "timestamps, settling" if self._timing.settling else "timestamps"
            return max(0.0, self.clock.origin() - origin), basis
        jitter = self._timing.jitter()
        if jitter is not None:
            return jitter, "arrival jitter"
        return self.stats.granted_latency_s, "reported"

    @property
    def latency_s(self) -> float:
        return self.measured_latency()[0]

    def _callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.stats.overruns += 1
        now = time.monotonic()
        block = indata[:, 0]
        deliver(self.ring, self.clock, block, now)
        delay = host_delay(time_info.currentTime, time_info.inputBufferAdcTime)
        self._timing.on_block(self.ring.end - frames, frames, now, delay)
        self.stats.blocks += 1
        self.stats.level_db = _db(block)
        self._last_block = now

    def start(self) -> None:
        if self.device_index is None:  # poll looks for one
            log.warning("%s", WAITING)
            return
        sd = portaudio.load()
        try:
            self._stream = portaudio.open_stream(
                self._callback, playback=False, device=self.device_index,
                latency=REQUESTED_LATENCY_S, properties={CAPTURE_TAG: self._tag},
            )  # fmt: skip
            self._timing = CaptureTiming()  # a reopened device starts afresh
            self._stream.start()
        except sd.PortAudioError as exc:
            self._stream = None
            raise AudioDeviceError(f"cannot open microphone {self.name!r}: {exc}") from None
        self.stats.granted_latency_s = float(self._stream.latency)
        self._last_block, self._blocks_at_start = time.monotonic(), self.stats.blocks

    def poll(self) -> None:
        """Called periodically: notices a stalled or unplugged device and reopens it (one log
        line when it stops, one when it delivers again), or looks for a device."""
        now = time.monotonic()
        if self.device_index is None:
            self._look_for_device(now)
            return
        if self._stalled_since is not None and self.stats.blocks > self._blocks_at_stall:
            log.info("microphone %r delivers again", self.name)
            self._stalled_since = None
        silent_for = now - self._last_block  # a reopened stream counts from its start
        if self._stalled_since is None:
            # a new stream's first block can take seconds (PulseAudio's ALSA plugin)
            grace = STALL_S if self.stats.blocks > self._blocks_at_start else REOPEN_S
            if silent_for < grace:
                self.stats.problem = ""
                self._keep_off_own_output(now)
                return
            self._stalled_since, self._blocks_at_stall = self._last_block, self.stats.blocks
            log.warning("microphone %r delivers no audio (unplugged?); reopening it every "
                        "%.0f s until it does", self.name, REOPEN_S)  # fmt: skip
            # a clock time, not a running count: a reopen waiting on a hung server would
            # leave a count frozen on the dashboard
            since = datetime.now() - timedelta(seconds=now - self._stalled_since)
            self.stats.problem = (
                f"microphone {self.name!r} has delivered no audio since "
                f"{since:%H:%M:%S} (unplugged?)"
            )
        self.stats.level_db = -120.0  # not the last block's level, frozen
        if silent_for < REOPEN_S or now < self._next_retry:
            return
        self._next_retry = now + RETRY_S
        self.stop()
        portaudio.rescan()  # a microphone plugged in again may come back under a new index
        try:
            self.device_index, self.name = resolve_input_device(self.name)
            self.start()
        except NoMicrophone:  # no input left at all: wait for one
            self._wait_for_device()
        except AudioDeviceError as exc:  # said once above; the dashboard shows the rest
            log.debug("%s", exc)

    def _keep_off_own_output(self, now: float) -> None:
        """Moves the capture off livecam's own virtual microphone, where the sound server put
        it: back to the source it was on before, or else another (microphones first)."""
        if not self.avoid_own_output or now < self._next_check:
            return
        self._next_check = now + RETRY_S
        own = own_source()
        try:  # briefly: a hung server must not hold up the stall check
            found = pulse.record_stream(CAPTURE_TAG, self._tag, timeout_s=CHECK_TIMEOUT_S)
            if found is None:  # not a stream of the sound server (an ALSA device)
                return
            index, source = found
            if not source.startswith(own):
                self._captured_from = source
                return
            others = [s for s in pulse.sources(CHECK_TIMEOUT_S) if not s.startswith(own)]
            if not others:
                return
            target = self._captured_from if self._captured_from in others else others[0]
            pulse.pactl("move-source-output", str(index), target, timeout_s=CHECK_TIMEOUT_S)
        except pulse.PulseError as exc:  # a server gone or hung: the stall check handles it
            log.debug("checking where the microphone records from failed: %s", exc)
            return
        log.warning("the sound server moved livecam's microphone to livecam's own virtual "
                    "microphone (made the default input?), which would capture itself; "
                    "moved it back to %r", target)  # fmt: skip
        self._captured_from = target

    def _wait_for_device(self) -> None:
        self.device_index, self.name = None, "none"
        self._stalled_since = None
        self.stats.problem, self.stats.level_db = WAITING, -120.0
        log.warning("%s", WAITING)

    def _look_for_device(self, now: float) -> None:
        if now < self._next_retry:
            return
        self._next_retry = now + RETRY_S
        try:
            self.device_index, self.name = resolve_input_device(self._wanted)
        except NoMicrophone:
            self.stats.problem = WAITING
            return
        except AudioDeviceError as exc:  # inputs came, but none is the one asked for
            self.stats.problem = f"{exc} ({LOOKING})"
            return
        log.info("microphone %r found", self.name)
        self.stats.problem = ""
        try:
            self.start()
        except AudioDeviceError as exc:  # the stall check reopens it
            log.warning("%s", exc)

    def stop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except Exception as exc:  # a device that vanished can fail to close
                log.debug("closing the input stream failed: %s", exc)
            self._stream = None


class FileSource:
    """Plays an audio file into the ring at real-time pace, as if it came from a microphone."""

    def __init__(self, ring: AudioRing, clock: AudioClock, path: Path, loop: bool = False):
        self.ring, self.clock = ring, clock
        self.samples = read_audio(path)
        self.name = f"file {Path(path).name}"
        self.loop = loop
        self.stats = SourceStats()
        self.latency_s = 0.0
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-audio", daemon=True)

    def measured_latency(self) -> tuple[float, str]:
        return 0.0, "file"

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        pos = 0
        while not self._stop.is_set():
            if pos >= len(self.samples):
                if not self.loop:
                    self.finished = True
                    return
                pos = 0
            block = self.samples[pos : pos + BLOCK]
            pos += len(block)
            written = self.ring.end + len(block)
            self._stop.wait(max(0.0, start + written / SAMPLE_RATE - time.monotonic()))
            deliver(self.ring, self.clock, block, time.monotonic())
            self.stats.blocks += 1
            self.stats.level_db = _db(block)

    def poll(self) -> None:
        pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)
