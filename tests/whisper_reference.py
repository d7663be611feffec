"""MuseTalk's whisper features written from the spec with transformers' own pieces (independent
of livecam.features.whisper), and the causal reference for the streaming path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def reference_encoder(models_dir: Path):
    """(feature extractor, WhisperEncoder) from a whisper folder (pickle or safetensors)."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = models_dir / "whisper"
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(folder)).eval()
    path = folder / "pytorch_model.bin"
    state = (
        torch.load(path, weights_only=True)
        if path.is_file()
        else load_file(folder / "model.safetensors")
    )
    prefix = "model.encoder."
    encoder.load_state_dict(
        {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
    )
    return extractor, encoder


def reference_features(models_dir: Path, audio: np.ndarray, fps: float) -> np.ndarray:
    """MuseTalk v1.5's audio features: 30 s segments, 5 hidden states, 10 steps per frame."""
    extractor, encoder = reference_encoder(models_dir)
    hidden = []
    for i in range(0, len(audio), 480_000):  # 30 s segments, each padded to 30 s
        mel = extractor(audio[i : i + 480_000], sampling_rate=16_000, return_tensors="pt")
        with torch.no_grad():
            out = encoder(mel.input_features, output_hidden_states=True)
        hidden.append(torch.stack(out.hidden_states, dim=2)[0].numpy())  # (1500, 5, 384)
    steps = np.concatenate(hidden)[: math.floor(len(audio) / 16_000 * 50)]
    per_frame = math.ceil(50 / fps)
    left, right = np.zeros((2 * per_frame, 5, 384)), np.zeros((6 * per_frame, 5, 384))
    padded = np.concatenate([left, steps, right])
    n = math.floor(len(audio) / 16_000 * fps)
    windows = [padded[math.floor(i * 50 / fps) :][:10] for i in range(n)]
    return np.stack(windows).reshape(n, 50, 384).astype(np.float32)


def causal_reference(
    models_dir: Path, audio: np.ndarray, fps: float, frames: Sequence[int]
) -> np.ndarray:
    """Each frame as MuseTalk would compute it from only the audio a live frame can have
    heard (up to 120 ms after it): all of the past, whisper's own 30 s zero padding after."""
    out = []
    for i in frames:
        heard = (math.floor(i * 50 / fps) + 6) * 320  # the frame's last step, in samples
        out.append(reference_features(models_dir, audio[:heard], fps)[i])
    return np.stack(out)


def live_frames(whisper, audio: np.ndarray, fps: float, frames: Sequence[int]) -> np.ndarray:
    """The live path on chosen increasing frames, each as soon as its audio has arrived."""
    from livecam.audio.ring import AudioRing
    from livecam.features.whisper import StreamingFeatures

    stream = StreamingFeatures(whisper, fps)
    ring = AudioRing(len(audio) + 480_000)
    out = []
    for i in frames:
        ring.write(audio[ring.end : stream.samples_needed(i)])
        out.append(stream.features(ring, [i])[0].cpu().numpy())
    return np.stack(out)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
