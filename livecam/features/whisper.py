"""whisper-tiny encoder features, per video frame, as MuseTalk v1.5 defines them.

Offline (MuseTalk's definition): the audio is cut into 30 s segments, each padded to 30 s and
turned into a log-mel (3000 mel frames); the encoder's 5 hidden states (embedding output and
the 4 layers, the last one layer-normed) are stacked per step: (1500, 5, 384) per segment, 50
steps per second. The step sequence is trimmed to the audio's length, padded with
2 * ceil(50 / fps) zero steps on the left and 3 times that on the right, and frame i takes
the 10 steps starting at floor(i * 50 / fps) of the padded sequence (at 25 fps: 80 ms before
the frame to 80 ms after it), flattened time-major to (50, 384).

Streaming: the encoder runs on a fixed-length window of recent audio (left context, ending at
the newest sample a frame needs), once per generate call. Windows stay inside the offline
30 s segment grid and take the positional embedding of their place in the segment, so a step
gets the same position as offline (whisper's embedding output, one of the 5 states, is
mostly position). whisper clamps the log-mel at its maximum - 8 over the whole segment; the
stream uses the loudest value heard so far in the segment (a running maximum). What remains is
the context: none to the right of the newest sample. On real whisper weights that is nearly
all of the deviation (about 0.35 relative L2; left context, zero padding and placement change it
by under 0.03), because the encoder attends to the whole future; `lookahead_s` trades latency
for it (0.16 s: 0.25, 0.64 s: 0.17, 2.56 s: 0.13 to 0.15; README, "Real whisper weights").
Step outputs are cached by absolute step index: the encoder runs once per generate call
(a feature step of several frames), not once per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livecam.audio.ring import AudioRing
from livecam.constants import SAMPLE_RATE, exact_div

STEPS_PER_SECOND = 50  # whisper encoder output rate
STEP_SAMPLES = exact_div(SAMPLE_RATE, STEPS_PER_SECOND)  # 320
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # whisper's 30 s input
SEGMENT_STEPS = exact_div(SEGMENT_SAMPLES, STEP_SAMPLES)  # 1500
WINDOW_STEPS = 10  # steps per frame: 2 * (2 left + 2 right + 1)
N_STATES = 5  # embedding output + 4 encoder layers
CACHED_STEPS = 20 * STEPS_PER_SECOND  # streamed steps kept for frames asked for again


def pad_steps(fps: float) -> tuple[int, int]:
    """(left, right) zero steps padded around the step sequence, as MuseTalk does."""
    per_frame = math.ceil(STEPS_PER_SECOND / fps)
    return 2 * per_frame, 3 * 2 * per_frame


def frame_steps(frame: int, fps: float) -> tuple[int, int]:
    """[lo, hi) absolute step indices (negative = left padding) that frame `frame` uses."""
    left, _ = pad_steps(fps)
    lo = math.floor(frame * (STEPS_PER_SECOND / fps)) - left
    return lo, lo + WINDOW_STEPS


@torch.inference_mode()
def encoder_states(
    encoder: torch.nn.Module, mel: torch.Tensor, position: int | Sequence[int] = 0
) -> torch.Tensor:
    """(B, 80, N) log-mel -> (B, N // 2, 5, D): the 5 hidden states of a WhisperEncoder.

    Same arithmetic as the encoder's own forward with output_hidden_states, but any even N
    up to 3000 is accepted: the positional embedding is sliced from `position` (the
    window's step offset inside its 30 s segment; one per row for a batch of windows), for
    the streaming window.
    """
    x = torch.nn.functional.gelu(encoder.conv1(mel))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (B, N/2, D)
    table = encoder.embed_positions.weight
    if isinstance(position, int):
        x = x + table[position : position + x.shape[1]]
    else:
        steps = torch.arange(x.shape[1], device=table.device)
        x = x + table[torch.as_tensor(position, device=table.device)[:, None] + steps]
    states = [x]
    for layer in encoder.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5.x
        states.append(x)
    states[-1] = encoder.layer_norm(x)
    return torch.stack(states, dim=2)


class WhisperAudio:
    """Log-mel (the checkpoint's WhisperFeatureExtractor) + encoder on one device/dtype."""

    def __init__(self, encoder: torch.nn.Module, extractor: Any, device: torch.device) -> None:
        self.encoder = encoder
        self.extractor = extractor
        self.device = device
        self.dtype = next(encoder.parameters()).dtype
        self.dim = int(encoder.embed_positions.weight.shape[1])

    def steps(self, audio: np.ndarray) -> torch.Tensor:
        """Up to 30 s of audio -> (1500, 5, D) float32: whisper's input, the extractor's log-mel
        of the audio padded with silence (or cut) to 30 s."""
        mel = self.extractor(
            np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np"
        ).input_features  # (1, 80, 3000)
        mel_t = torch.from_numpy(mel).to(self.device, self.dtype)
        return encoder_states(self.encoder, mel_t)[0].float()

    def log_mel(self, audio: np.ndarray, length: int) -> torch.Tensor:
        """(80, length / 160) log10 mel power of audio zero-padded to length, on the CPU in
        float32, before whisper's normalisation (which `steps_from_mel` applies)."""
        return self.log_mels([audio], length, torch.device("cpu"))[0]

    def log_mels(
        self, audios: Sequence[np.ndarray], length: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """(B, 80, length / 160): `log_mel` of several clips at once, in float32 on `device`
        (default: the encoder's; a pool's merged call makes them all on its GPU)."""
        ex, device = self.extractor, device or self.device
        waves = np.zeros((len(audios), length), np.float32)
        for row, audio in enumerate(audios):
            clip = np.asarray(audio[:length])
            waves[row, : len(clip)] = clip  # cast to float32 as it is copied
        window = torch.hann_window(ex.n_fft, device=device)
        stft = torch.stft(torch.from_numpy(waves).to(device), ex.n_fft, ex.hop_length,
                          window=window, return_complex=True)  # fmt: skip
        power = (stft[..., :-1].abs() ** 2).contiguous()
        filters = torch.from_numpy(ex.mel_filters).float().T.to(device)
        return torch.clamp(filters @ power, min=1e-10).log10()

    def steps_from_mel(self, log_mel: torch.Tensor, peak: float, position: int) -> torch.Tensor:
        """(N / 2, 5, D) float32 steps of a log_mel whose clamp uses `peak` as its maximum."""
        return self.steps_from_mels(log_mel[None], [peak], [position])[0]

    def steps_from_mels(
        self, log_mels: torch.Tensor, peaks: Sequence[float], positions: Sequence[int]
    ) -> torch.Tensor:
        """(B, N / 2, 5, D) float32: `steps_from_mel` of a batch of windows in one run."""
        floors = torch.tensor([peak - 8.0 for peak in peaks], device=log_mels.device)
        norm = (torch.maximum(log_mels, floors[:, None, None]) + 4.0) / 4.0
        mel_t = norm.to(self.device, self.dtype)
        return encoder_states(self.encoder, mel_t, list(positions)).float()


def offline_steps(whisper: WhisperAudio, audio: np.ndarray) -> torch.Tensor:
    """(floor(seconds * 50), 5, D): 30 s segments, concatenated and trimmed."""
    parts = [
        whisper.steps(audio[i : i + SEGMENT_SAMPLES]) for i in range(0, len(audio), SEGMENT_SAMPLES)
    ]
    actual = math.floor(len(audio) / SAMPLE_RATE * STEPS_PER_SECOND)
    if not parts:
        return torch.zeros((0, N_STATES, whisper.dim), device=whisper.device)
    return torch.cat(parts)[:actual]


def frames_from_steps(
    steps: torch.Tensor, frames: Sequence[int], fps: float, first_step: int = 0
) -> torch.Tensor:
    """(n, 50, D) per-frame windows from steps[s - first_step] (zeros outside the tensor)."""
    n_states, dim = steps.shape[1:]
    out = torch.zeros((len(frames), WINDOW_STEPS, n_states, dim), device=steps.device)
    for row, frame in enumerate(frames):
        lo, hi = frame_steps(frame, fps)
        a, b = max(lo, first_step), min(hi, first_step + len(steps))
        if a < b:
            out[row, a - lo : b - lo] = steps[a - first_step : b - first_step]
    return out.reshape(len(frames), WINDOW_STEPS * n_states, dim)


def offline_features(
    whisper: WhisperAudio, audio: np.ndarray, fps: float, n_frames: int | None = None
) -> torch.Tensor:
    """(T, 50, D) features of a whole clip; T defaults to floor(seconds * fps) like MuseTalk."""
    if n_frames is None:
        n_frames = math.floor(len(audio) / SAMPLE_RATE * fps)
    return frames_from_steps(offline_steps(whisper, audio), range(n_frames), fps)


class StreamingFeatures:
    """Per-frame features from the ring, computed on a sliding window of recent audio."""

    def __init__(
        self,
        whisper: WhisperAudio,
        fps: float,
        context_s: float = 8.0,
        lookahead_s: float = 0.0,
    ) -> None:
        self.whisper = whisper
        self.fps = fps
        self.window = max(2 * WINDOW_STEPS, round(context_s * STEPS_PER_SECOND))  # steps
        if self.window > SEGMENT_STEPS:
            raise ValueError("the streaming window must fit in whisper's 30 s")
        self.min_left = self.window // 2  # every cached step has at least this much context
        self.capacity = max(CACHED_STEPS, self.window)
        self.lookahead = round(lookahead_s * STEPS_PER_SECOND)  # heard past a frame: latency
        self._cache = torch.zeros((self.capacity, N_STATES, whisper.dim), device=whisper.device)
        self._lo = self._hi = 0  # cached absolute steps [lo, hi)
        self._peak_heard = (-1, -math.inf)  # (segment, loudest log-mel value in it so far)
        self.encoder_runs = 0

    def samples_needed(self, frame: int) -> int:
        return (frame_steps(frame, self.fps)[1] + self.lookahead) * STEP_SAMPLES

    def _window(self, ring: AudioRing, end: int, write_from: int) -> _Window:
        """The audio of a window ending at step `end` (zeros after it near a segment start)."""
        segment = (end - 1) // SEGMENT_STEPS * SEGMENT_STEPS
        start = max(segment, end - self.window)
        a = max(start * STEP_SAMPLES, ring.start)  # overwritten audio reads as silence
        audio = np.zeros((end - start) * STEP_SAMPLES, dtype=np.float32)
        if a < end * STEP_SAMPLES:
            audio[a - start * STEP_SAMPLES :] = ring.read(a, end * STEP_SAMPLES)
        return _Window(audio, segment, start, end, write_from)

    def _peak(self, window: _Window, heard: float) -> float:
        """The clamp's maximum: whisper's is the segment's max (- 8); the closest a stream
        knows is the loudest it heard in the segment so far (`heard`: in this window)."""
        peak = heard
        if self._peak_heard[0] == window.segment:
            peak = max(peak, self._peak_heard[1])
        self._peak_heard = (window.segment, peak)
        return peak

    def _store(self, window: _Window, steps: torch.Tensor) -> None:
        """Cache the window's steps from its `write_from` on."""
        self.encoder_runs += 1
        contiguous = self._lo <= window.write_from <= self._hi
        idx = torch.arange(window.write_from, window.end, device=self._cache.device)
        first = window.write_from - window.start
        self._cache[idx % self.capacity] = steps[first : window.end - window.start]
        self._lo = self._lo if contiguous else window.write_from
        self._hi = window.end
        self._lo = max(self._lo, window.end - self.capacity)

    def _runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(end, write_from) of the windows that make steps [lo, hi) available (negative
        steps are padding, never computed): one, unless they span a segment edge or a long
        stretch."""
        lo = max(lo, 0)
        if hi <= 0 or (self._lo <= lo and hi <= self._hi):
            return []
        if hi < self._hi:  # went back in time: forget the cache
            self._lo = self._hi = 0
        span, runs = self.window - self.min_left, []
        while lo < hi:
            end = min(hi, (lo // SEGMENT_STEPS + 1) * SEGMENT_STEPS, lo + span)
            runs.append((end, lo))
            lo = end
        return runs

    def _steps(self, frames: Sequence[int]) -> tuple[int, int]:
        """[lo, hi): the steps increasing frames use."""
        return frame_steps(frames[0], self.fps)[0], frame_steps(frames[-1], self.fps)[1]

    def _gather(self, frames: Sequence[int]) -> torch.Tensor:
        want_lo, want_hi = self._steps(frames)
        lo, hi = max(self._lo, want_lo, 0), min(self._hi, want_hi)  # gather only these steps
        idx = torch.arange(lo, max(lo, hi), device=self._cache.device) % self.capacity
        return frames_from_steps(self._cache[idx], frames, self.fps, first_step=lo)

    def features(self, ring: AudioRing, frames: Sequence[int]) -> torch.Tensor:
        """(n, 50, D) features for increasing frames."""
        return features_together([(self, ring, frames)])[0]


@dataclass(frozen=True)
class _Window:
    audio: np.ndarray  # (end - start) steps of audio
    segment: int  # the 30 s segment's first step
    start: int  # absolute steps [start, end)
    end: int
    write_from: int  # the steps it caches: [write_from, end)


def _encode(windows: Sequence[tuple[StreamingFeatures, _Window]]) -> None:
    """Encode windows of one or more streams, of one window length, in one batch; each
    stream's in its order (its running peak goes from one to the next)."""
    if not windows:
        return
    whisper, length = windows[0][0].whisper, windows[0][0].window
    if any(source.window != length for source, _ in windows):
        raise ValueError("windows encoded together must have one length")
    mels = whisper.log_mels([w.audio for _, w in windows], length * STEP_SAMPLES)
    steps = torch.arange(mels.shape[-1], device=mels.device)
    valid = steps[None, :] < torch.tensor([2 * (w.end - w.start) for _, w in windows],
                                          device=mels.device)[:, None]  # fmt: skip
    heard = mels.amax(dim=1).masked_fill(~valid, -math.inf).amax(dim=1).tolist()
    peaks = [source._peak(w, loud) for (source, w), loud in zip(windows, heard, strict=True)]
    states = whisper.steps_from_mels(mels, peaks, [w.start - w.segment for _, w in windows])
    for (source, window), row in zip(windows, states, strict=True):
        source._store(window, row)


def features_together(
    jobs: Sequence[tuple[StreamingFeatures, AudioRing, Sequence[int]]],
) -> list[torch.Tensor]:
    """(n, 50, D) features of several streams' frames (each: its source, ring and frames),
    their windows encoded in one batch: what each source's `features` gives, in one run of
    the log-mel and the encoder for a pool's merged call rather than one per stream."""
    windows = []
    for source, ring, frames in jobs:
        lo, hi = source._steps(frames)
        runs = source._runs(lo, hi + source.lookahead)
        windows += [(source, source._window(ring, end, start)) for end, start in runs]
    by_length: dict[int, list[tuple[StreamingFeatures, _Window]]] = {}
    for source, window in windows:
        by_length.setdefault(source.window, []).append((source, window))
    for group in by_length.values():
        _encode(group)
    return [source._gather(frames) for source, _, frames in jobs]


class OfflineFeatures:
    """Features over all the audio in the ring (render), recomputed only when it grew."""

    def __init__(self, whisper: WhisperAudio, fps: float) -> None:
        self.whisper = whisper
        self.fps = fps
        self._steps: torch.Tensor | None = None
        self._samples = -1

    def samples_needed(self, frame: int) -> int:
        return frame_steps(frame, self.fps)[1] * STEP_SAMPLES

    def features(self, ring: AudioRing, frames: Sequence[int]) -> torch.Tensor:
        if self._steps is None or ring.end != self._samples:
            self._steps = offline_steps(self.whisper, ring.read(0, ring.end))
            self._samples = ring.end
        return frames_from_steps(self._steps, frames, self.fps)


def streaming_features(
    whisper: WhisperAudio, audio: np.ndarray, fps: float, n_frames: int, *, batch: int,
    **options: float,
) -> np.ndarray:  # fmt: skip
    """Live-path features: the ring holds only what has 'arrived' for each batch of frames
    (options: StreamingFeatures' context_s, lookahead_s...)."""
    stream = StreamingFeatures(whisper, fps, **options)
    ring = AudioRing(len(audio) + SEGMENT_SAMPLES)
    out = np.zeros((n_frames, WINDOW_STEPS * N_STATES, whisper.dim), np.float32)
    for first in range(0, n_frames, batch):
        frames = list(range(first, min(n_frames, first + batch)))
        need = stream.samples_needed(frames[-1])
        if need > ring.end:
            chunk = audio[ring.end : need]
            ring.write(np.pad(chunk, (0, need - ring.end - len(chunk))))  # silence past the end
        out[first : first + len(frames)] = stream.features(ring, frames).cpu().numpy()
    return out


def streaming_deviation(
    whisper: WhisperAudio, audio: np.ndarray, fps: float, *, batch: int, **options: float
) -> dict[str, Any]:
    """How far the live (streaming) features are from MuseTalk's offline ones on a clip,
    computed `batch` frames a call: relative L2 over all frames, and per hidden state
    (0 = embedding output, 4 = last)."""
    offline = offline_features(whisper, audio, fps).cpu().numpy()
    n = len(offline)
    live = streaming_features(whisper, audio, fps, n, batch=batch, **options)
    shape = (n, WINDOW_STEPS, N_STATES, whisper.dim)  # frames are flattened time-major

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return round(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)), 4)

    per_state = [
        rel(live.reshape(shape)[:, :, s], offline.reshape(shape)[:, :, s]) for s in range(N_STATES)
    ]
    return {"relative_l2": rel(live, offline), "per_state_relative_l2": per_state,
            "frames": n, "batch": batch, **options}  # fmt: skip
