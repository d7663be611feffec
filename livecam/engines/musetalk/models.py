"""The loaded MuseTalk model set on one device, from a models dir or (benchmarks) random."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livecam.constants import SAMPLE_RATE
from livecam.engines.musetalk import weights
from livecam.engines.musetalk.architecture import (
    REFERENCE_UNET,
    REFERENCE_VAE,
    REFERENCE_WHISPER,
    TINY_TAESD,
    TINY_UNET,
    TINY_VAE,
    TINY_WHISPER,
)
from livecam.engines.musetalk.manifest import component, has_component, missing_weights
from livecam.features.whisper import WhisperAudio, offline_features, streaming_features

log = logging.getLogger(__name__)


class MissingWeights(weights.WeightsError):
    """Required weight files are absent."""


@dataclass
class MuseTalkModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    taesd: torch.nn.Module | None
    whisper: WhisperAudio
    device: torch.device
    dtype: torch.dtype
    vae_id: str  # identifies the VAE weights (for the avatar latents cache)
    warnings: tuple[str, ...] = ()  # shown on the dashboard and logged


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise weights.WeightsError(f"--torch-device {device}: this torch build has no CUDA device")
    return dev


def pick_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU, unless asked otherwise (tests run fp16 on the CPU)."""
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def _place(models: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)  # a cast warns "should be kept in float32: []"
    try:
        for key in ("unet", "vae", "taesd", "encoder"):
            if models.get(key) is not None:
                model = models[key].to(device=device, dtype=dtype)
                models[key] = model.eval().requires_grad_(False)
    finally:
        diffusers_log.setLevel(level)


def load_models(
    models_dir: Path, device: str | None = None, dtype: torch.dtype | None = None
) -> MuseTalkModels:
    if missing := missing_weights(models_dir):
        raise MissingWeights(missing)
    dev = pick_device(device)
    dtype = pick_dtype(dev, dtype)
    parts: dict[str, Any] = {
        "unet": weights.load_unet(models_dir),
        "vae": weights.load_vae(models_dir),
        "taesd": weights.load_taesd(models_dir) if has_component(models_dir, "taesd") else None,
        "encoder": weights.load_whisper_encoder(models_dir),
    }
    _place(parts, dev, dtype)
    extractor = weights.load_feature_extractor(models_dir)
    vae_file = models_dir / component("vae").folder / "diffusion_pytorch_model.bin"
    return MuseTalkModels(
        parts["unet"], parts["vae"], parts["taesd"],
        WhisperAudio(parts["encoder"], extractor, dev),
        dev, dtype, weights.cached_sha256(vae_file), _unpublished(models_dir),
    )  # fmt: skip


def _unpublished(models_dir: Path) -> tuple[str, ...]:
    """A warning per weight file that is not a published release (used, but said so)."""
    from livecam.engines.musetalk.download import release_mismatches

    notes = tuple(
        f"{path.relative_to(models_dir)} is not the published release (sha256 differs): "
        "check it with `livecam models verify`"
        for path in release_mismatches(models_dir)
    )
    for note in notes:
        log.warning("%s", note)
    return notes


def random_models(
    device: str | None = None, seed: int = 0, tiny: bool = False, whisper_dir: Path | None = None
) -> MuseTalkModels:
    """Full-size (or toy-size) models with random weights: benchmarks without downloads; the
    whisper of `whisper_dir` instead where it holds one (e.g. imported real weights)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(seed)
    dev = pick_device(device)
    dtype = pick_dtype(dev, None)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(TINY_UNET if tiny else REFERENCE_UNET),
        "vae": AutoencoderKL.from_config(TINY_VAE if tiny else REFERENCE_VAE),
        "taesd": AutoencoderTiny.from_config(TINY_TAESD if tiny else {}),
        "encoder": WhisperEncoder(WhisperConfig(**(TINY_WHISPER if tiny else REFERENCE_WHISPER))),
    }
    extractor: Any = WhisperFeatureExtractor(feature_size=80)
    if whisper_dir is not None and has_component(whisper_dir, "whisper"):
        parts["encoder"] = weights.load_whisper_encoder(whisper_dir)
        extractor = weights.load_feature_extractor(whisper_dir)
    _place(parts, dev, dtype)
    return MuseTalkModels(
        parts["unet"], parts["vae"], parts["taesd"],
        WhisperAudio(parts["encoder"], extractor, dev),
        dev, dtype, f"random-{seed}{'-tiny' if tiny else ''}",
    )  # fmt: skip


def whisper_from_dir(models_dir: Any, device: str | None = None) -> WhisperAudio:
    """Only the whisper part of the models dir (no UNet or VAE loaded)."""
    dev = pick_device(device)
    encoder = weights.load_whisper_encoder(models_dir).to(dev, pick_dtype(dev, None))
    return WhisperAudio(encoder, weights.load_feature_extractor(models_dir), dev)


def compute_features(
    models_dir: Any, audio: np.ndarray, fps: float, streaming: bool, device: str | None = None
) -> np.ndarray:
    """(T, 50, D) float32 per-frame features of a clip, offline or through the live path.

    The streaming path is driven like the live engine: one frame at a time, each as soon as
    its audio (incl. the look-ahead) is in the ring.
    """
    whisper = whisper_from_dir(models_dir, device)
    n_frames = math.floor(len(audio) / SAMPLE_RATE * fps)
    if not streaming:
        return offline_features(whisper, audio, fps, n_frames).cpu().numpy()
    return streaming_features(whisper, audio, fps, n_frames, batch=1)
