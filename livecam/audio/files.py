"""Reading audio files into livecam's internal format: mono float32 at SAMPLE_RATE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from livecam.constants import SAMPLE_RATE


class AudioFileError(Exception):
    """An audio file that cannot be used, with a message fit for the user."""


def read_audio(path: Path) -> np.ndarray:
    """Decode a WAV/FLAC/OGG file to mono float32 at SAMPLE_RATE."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioFileError(
            f"cannot read audio from {path}: {exc}. Use a WAV, FLAC or OGG file "
            f"(convert others with: ffmpeg -i INPUT -ar {SAMPLE_RATE} -ac 1 out.wav)"
        ) from None
    if len(data) == 0:
        raise AudioFileError(f"audio file {path} contains no samples")
    mono = data.mean(axis=1)
    return resample(mono, rate, SAMPLE_RATE)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a whole signal by zero-padding or truncating its spectrum."""
    if rate_in == rate_out:
        return np.ascontiguousarray(x, dtype=np.float32)
    n_out = round(len(x) * rate_out / rate_in)
    spectrum = np.fft.rfft(x)
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / len(x))
    return out.astype(np.float32)
