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
        self._modules: list[str] = []
        self._stream = None
        self._timing = StreamTiming(playback=True, window=TIMING_BLOCKS)
        self._played = 0  # samples the stream has asked for so far

    def start(self) -> None:
        if not pulse.available():
            raise VirtualMicError(
                "--virtual-mic needs pactl (sudo apt-get install pulseaudio-utils) and a "
                "running PulseAudio or PipeWire (pipewire-pulse) server; `pactl info` failed"
            )
        try:
            self._create_devices()
        except pulse.PulseError as exc:
            self.stop()
            raise VirtualMicError(f"cannot create the virtual microphone: {exc}") from None
        self._open_stream()

    def _create_devices(self) -> None:
        if remove_stale(self.source):
            log.warning("removed a virtual microphone left over by an earlier run")
        self._modules = pulse.create_fed_source(self.sink, self.source, DESCRIPTION)

    def _open_stream(self) -> None:
        sd = portaudio.load()

        for attempt in range(2):
            try:
                self._stream = portaudio.open_stream(
                    self._callback, playback=True, pulse_device=self.sink
                )
                self._timing, self._played = StreamTiming(playback=True, window=TIMING_BLOCKS), 0
                self._stream.start()
                return
            except sd.PortAudioError as exc:
                self._close_stream()
                # PortAudio may have listed its devices before the sound server came up
                if attempt == 0 and portaudio.rescan():
                    continue
                self.stop()
                raise VirtualMicError(f"cannot play into the virtual microphone: {exc}") from None

    def _callback(self, outdata, frames, time_info, status) -> None:
        now = time.monotonic()
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
            self._stream.abort()
            self._stream.close()
            self._stream = None

    def stop(self) -> None:
        self._close_stream()
        pulse.unload_all(self._modules)
        self._modules = []
