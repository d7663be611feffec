"""Input limits, checked before anything is allocated: a tiny file or flag must never make
livecam allocate gigabytes. Each check raises LimitError with one line fit for the user."""

from __future__ import annotations

import math

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000  # Hz: telephone speech to studio audio
MAX_AUDIO_SECONDS = 3600.0  # one hour: 230 MB of 16 kHz float32, livecam's largest array
MAX_AUDIO_CHANNELS = 16
MIN_AUDIO_SECONDS = 0.01  # shorter than any sound the face could show
MAX_IMAGE_PIXELS = 64_000_000  # 8000x8000: above any phone camera; ~200 MB decoded
MIN_FPS, MAX_FPS = 1.0, 120.0
MAX_WIDTH, MAX_HEIGHT = 3840, 2160  # 4K UHD: 25 MB a frame
MIN_SIDE = 64
MAX_RUN_SECONDS = 7 * 86_400.0  # --duration, --soak: a week
MAX_LOAD_FACTOR = 100.0  # --simulate-load: a frame costing 100 frame budgets
MAX_BURSTS = 1000  # bench --latency: 0.6 s each, 10 minutes
DEFAULT_BURSTS = 30
MAX_STREAMS = 64  # bench --streams: live pipelines in one process
MAX_OUTPUT_BYTES = 1 << 30  # an array written whole (livecam features): 1 GiB


class LimitError(ValueError):
    """An input outside livecam's limits; the message names the limit."""


def check_fps(fps: float) -> float:
    if not math.isfinite(fps) or not MIN_FPS <= fps <= MAX_FPS:
        raise LimitError(f"frame rate {fps} is outside {MIN_FPS:g} to {MAX_FPS:g} fps")
    return fps


def check_range(value: float, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high], or in (low, high] with low_open."""
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"{low:g} to {high:g}"
        raise LimitError(f"must be {bounds}, not {value:g}")
    return value


def check_size(width: int, height: int) -> tuple[int, int]:
    if width < MIN_SIDE or height < MIN_SIDE or width % 2 or height % 2:
        raise LimitError(f"width and height must be even and at least {MIN_SIDE}")
    if width > MAX_WIDTH or height > MAX_HEIGHT:
        raise LimitError(f"{width}x{height} is larger than {MAX_WIDTH}x{MAX_HEIGHT}")
    return width, height


def check_audio(what: str, rate: int, frames: int, channels: int) -> None:
    """A decoded file's header, before its samples are read."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise LimitError(
            f"{what} is sampled at {rate} Hz; livecam reads {MIN_SAMPLE_RATE} to "
            f"{MAX_SAMPLE_RATE} Hz (convert with: ffmpeg -i INPUT -ar 16000 -ac 1 out.wav)"
        )
    if not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise LimitError(f"{what} has {channels} channels; at most {MAX_AUDIO_CHANNELS} are read")
    seconds = frames / rate
    if seconds > MAX_AUDIO_SECONDS:
        raise LimitError(
            f"{what} is {seconds / 60:.0f} minutes long; livecam reads at most "
            f"{MAX_AUDIO_SECONDS / 60:.0f} (cut it with: ffmpeg -i INPUT -t 3600 out.wav)"
        )
    if seconds < MIN_AUDIO_SECONDS:
        raise LimitError(f"{what} is too short ({frames} samples): nothing to animate")


def check_pixels(what: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise LimitError(
            f"{what} is {width}x{height}: more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels; "
            "scale it down first (a face needs far fewer)"
        )


def check_output_bytes(what: str, nbytes: int, hint: str) -> None:
    """An array that would be built whole in memory, before it is."""
    if nbytes > MAX_OUTPUT_BYTES:
        raise LimitError(
            f"{what} would take {nbytes / 2**30:.1f} GiB, more than livecam builds at once "
            f"({MAX_OUTPUT_BYTES / 2**30:g} GiB); {hint}"
        )
