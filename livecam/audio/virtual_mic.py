"""A "LiveCam Microphone": the microphone delayed to match the camera, via PulseAudio/PipeWire.

A meeting app hears the raw microphone at once but sees the mouth only after the pipeline's
latency. Selecting this virtual microphone instead makes picture and sound arrive together:
livecam creates a null sink plus a source remapped from its monitor, and plays the captured
audio into the sink, delayed by the camera's latency. Both are removed on exit, and left-overs
of a crashed run are removed at the next start.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from livecam.audio import portaudio, pulse
from livecam.audio.clock import AudioClock
from livecam.audio.ring import AudioRing
from livecam.audio.timing import StreamTiming, host_delay
from livecam.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

SOURCE = "livecam_mic"
DESCRIPTION = "LiveCam Microphone"
NAME_ENV = "LIVECAM_VIRTUAL_MIC_NAME"  # another source name (tests never touch the user's)
# DAC stamps in the running median: 0.5 s, so that a jump of the stream's timeline that
# PortAudio does not flag as an underrun is forgotten soon; still within a millisecond or two
TIMING_BLOCKS = 50
STALL_S = 1.0  # no output callback for this long: the stream, or its sound server, is gone
STARTING_S = 3.0  # a new stream may pause this long (PulseAudio's ALSA plugin: 1.9 s seen)
RETRY_S = 2.0  # then the devices and the stream are made again this often


class VirtualMicError(Exception):
    """The virtual microphone cannot be created, with a message fit for the user."""


def source_name() -> str:
    """The virtual microphone's PulseAudio source name: $LIVECAM_VIRTUAL_MIC_NAME or SOURCE."""
    return os.environ.get(NAME_ENV) or SOURCE


def remove_stale(source: str = SOURCE) -> int:
    """Unload virtual-microphone modules left by a previous run; returns how many."""
    removed = 0
    for line in pulse.pactl("list", "short", "modules").splitlines():
        module_id, _, rest = line.partition("\t")
        words = rest.split()
        if f"sink_name={source}_sink" in words or f"source_name={source}" in words:
            pulse.unload(module_id)
            removed += 1
    return removed


class VirtualMic:
    """Plays ring audio into the LiveCam Microphone, `delay()` seconds behind capture.

    `poll` watches it: where the stream stops playing, what is gone is made again, every
    RETRY_S until it plays: the devices where the sound server restarted, the stream where the
    server no longer has it. A stream the server still has is only late (a machine too busy to
    call back for a second): a new one would lose more sound. Devices that are there are never
    made again: a meeting app recording from the microphone would lose it.

    The output callback asks which ring samples are due at the moment its buffer will be
    heard: PortAudio's DAC time, smoothed over the last blocks (timing.py), so the delay holds
    and never accumulates. After an underrun the stream's timeline jumps: it is measured
    afresh, each block's own DAC time (or the stream's latency) standing in meanwhile.
    """

    def __init__(
        self,
        ring: AudioRing,
        clock: AudioClock,
        delay: Callable[[], float],
        name: str | None = None,
    ) -> None:
        self.ring, self.clock, self.delay = ring, clock, delay
        self.source = name or source_name()
        self.sink = f"{self.source}_sink"
        self.muted = False
        self._devices = False  # this run's sink and source exist (as far as it knows)
        self._stream = None
        self._timing = StreamTiming(playback=True, window=TIMING_BLOCKS)
        self._played = 0  # samples the stream has asked for so far
        self.problem = ""  # why the meeting app hears nothing from it now; empty when fine
        self._running = False  # started and not stopped: poll keeps it playing
        self._last_callback = 0.0
        self._opened_at = 0.0  # the stream's
        self._next_retry = 0.0

    def start(self) -> None:
        if not pulse.available():
            raise VirtualMicError(
                "--virtual-mic needs pactl (sudo apt-get install pulseaudio-utils) and a "
                "running PulseAudio or PipeWire (pipewire-pulse) server; `pactl info` failed"
            )
        try:
            self._create_devices()
        except pulse.PulseError as exc:
            self._teardown()
            raise VirtualMicError(f"cannot create the virtual microphone: {exc}") from None
        try:
            self._open_stream()
        except VirtualMicError:
            self._teardown()
            raise
        self._running = True

    def poll(self) -> None:
        """Called periodically: what of a stream that stopped playing is gone is made again
        (one log line when it stops, one when it plays again)."""
        if not self._running:
            return
        now = time.monotonic()
        # a new stream's callbacks can pause for seconds after the first (PulseAudio's plugin)
        starting = now - self._opened_at < STARTING_S
        called_back = self._last_callback > self._opened_at
        if called_back and (starting or now - self._last_callback < STALL_S):
            if self.problem:
                log.info("the virtual microphone %r plays again", DESCRIPTION)
                self.problem = ""
            return
        if starting:
            return
        if not self.problem:
            self.problem = (
                f"the virtual microphone {DESCRIPTION!r} stopped playing (machine busy, or "
                f"sound server restarted?); looking again every {RETRY_S:.0f} s"
            )
            log.warning("%s", self.problem)
        if now < self._next_retry:
            return
        self._next_retry = now + RETRY_S
        try:
            if not pulse.available():  # gone for now: looked for again at the next retry
                return
            sink = self._sink_index()
            running = self._stream is not None and self._stream.active
            if sink is not None and running and pulse.streams_into(sink):
                return  # still playing there, only late
            self._close_stream()
            if sink is None:  # the devices are gone: the server restarted
                remove_stale(self.source)  # the half of them it may have kept
                self._create_devices()
            self._open_stream()
        except (pulse.PulseError, VirtualMicError) as exc:
            log.debug("making the virtual microphone again failed: %s", exc)

    def _sink_index(self) -> int | None:
        """The feed sink's index where the server has both devices, else None."""
        index = pulse.sinks().get(self.sink)
        return index if index is not None and self.source in pulse.sources() else None

    def _create_devices(self) -> None:
        if remove_stale(self.source):
            log.warning("removed a virtual microphone left over by an earlier run")
        pulse.create_fed_source(self.sink, self.source, DESCRIPTION)
        self._devices = True

    def _open_stream(self) -> None:
        sd = portaudio.load()

        for attempt in range(2):
            try:
                self._stream = portaudio.open_stream(
                    self._callback, playback=True, pulse_device=self.sink
                )
                self._timing, self._played = StreamTiming(playback=True, window=TIMING_BLOCKS), 0
                self._opened_at = time.monotonic()
                self._stream.start()
                return
            except sd.PortAudioError as exc:
                self._close_stream()
                # PortAudio may have listed its devices before the sound server came up
                if attempt == 0 and portaudio.rescan():
                    continue
                raise VirtualMicError(f"cannot play into the virtual microphone: {exc}") from None

    def _callback(self, outdata, frames, time_info, status) -> None:
        now = time.monotonic()
        self._last_callback = now
        if status.output_underflow:
            self._timing = StreamTiming(playback=True, window=TIMING_BLOCKS)
        delay = host_delay(time_info.currentTime, time_info.outputBufferDacTime, playback=True)
        self._timing.on_block(self._played, frames, now, delay)
        origin = self._timing.origin()
        if origin is not None:
            heard_at = origin + self._played / SAMPLE_RATE
        elif delay is not None:
            heard_at = now + delay
        else:  # a host without DAC timing: the stream's latency
            heard_at = now + (self._stream.latency if self._stream is not None else 0.0)
        self._played += frames
        outdata[:, 0] = 0.0
        if self.muted or not self.clock.started:
            return
        first = round((heard_at - self.delay() - self.clock.origin()) * SAMPLE_RATE)
        lo, hi = max(first, self.ring.start, 0), min(first + frames, self.ring.end)
        if hi > lo:
            outdata[lo - first : hi - first, 0] = self.ring.read(lo, hi)

    def _close_stream(self) -> None:
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except Exception as exc:  # a stream whose server went away can fail to close
                log.debug("closing the virtual microphone's stream failed: %s", exc)
            self._stream = None

    def stop(self) -> None:
        self._running = False
        self._teardown()

    def _teardown(self) -> None:
        self._close_stream()
        if self._devices:  # by name: module ids mean nothing to a restarted server
            try:
                remove_stale(self.source)
            except pulse.PulseError as exc:  # no server: nothing of ours is left on it
                log.debug("removing the virtual microphone failed: %s", exc)
            self._devices = False
