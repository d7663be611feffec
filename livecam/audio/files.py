"""Reading audio files into livecam's internal format: mono float32 at SAMPLE_RATE.

The header is checked against livecam's limits before any sample is read, and the file is
decoded and resampled in blocks, so memory stays near the size of the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from livecam.constants import SAMPLE_RATE
from livecam.limits import LimitError, check_audio

BLOCK_SECONDS = 10  # resampled at a time ...
PAD_SECONDS = 1  # ... with this much context each side, so block edges leave no trace


class AudioFileError(Exception):
    """An audio file that cannot be used, with a message fit for the user."""


def read_audio(path: Path) -> np.ndarray:
    """Decode a WAV/FLAC/OGG file to mono float32 at SAMPLE_RATE."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(str(path)) as fh:
            if fh.frames <= 0:
                raise AudioFileError(f"audio file {path} contains no samples")
            check_audio(f"audio file {path}", fh.samplerate, fh.frames, fh.channels)
            return _decode(fh, SAMPLE_RATE)
    except LimitError as exc:
        raise AudioFileError(str(exc)) from None
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioFileError(
            f"cannot read audio from {path}: {exc}. Use a WAV, FLAC or OGG file "
            f"(convert others with: ffmpeg -i INPUT -ar {SAMPLE_RATE} -ac 1 out.wav)"
        ) from None


def _decode(fh: sf.SoundFile, rate_out: int) -> np.ndarray:
    """The whole file, mono, at rate_out: blocks of BLOCK_SECONDS read with PAD_SECONDS of
    context, resampled, and the context cut off again (whole seconds map exactly)."""
    rate_in, frames = fh.samplerate, fh.frames
    out = np.zeros(round(frames * rate_out / rate_in), np.float32)
    block, pad = BLOCK_SECONDS * rate_in, PAD_SECONDS * rate_in
    written = 0
    for start in range(0, frames, block):
        lo = max(0, start - pad)
        fh.seek(lo)
        chunk = fh.read(min(frames, start + block + pad) - lo, dtype="float32", always_2d=True)
        if len(chunk) <= start - lo:
            break  # the file holds fewer samples than its header says
        mono = resample(chunk.mean(axis=1), rate_in, rate_out)
        skip = (start - lo) * rate_out // rate_in  # whole seconds: exact
        first = start * rate_out // rate_in
        part = mono[skip : skip + min(BLOCK_SECONDS * rate_out, len(out) - first)]
        out[first : first + len(part)] = part
        written = first + len(part)
    if written == 0:
        raise ValueError("no samples could be decoded")
    return out[:written]


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a whole signal by zero-padding or truncating its spectrum."""
    if rate_in == rate_out:
        return np.ascontiguousarray(x, dtype=np.float32)
    n_out = max(1, round(len(x) * rate_out / rate_in))
    spectrum = np.fft.rfft(x)
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / len(x))
    return out.astype(np.float32)
