"""The musetalk engine: whisper features -> single-step UNet in VAE latent space -> decode.

Per generate call: the voice gate decides which frames speak (silence keeps the avatar's
closed-mouth neutral frame: MuseTalk itself keeps moving its mouth in silence); the speaking
frames' features come from the feature source (streaming or offline); the UNet and decoder run
in fixed batch shapes where shapes are captured (1, 2, 4, 8: a short batch is padded, so no
shape is ever new after the warm-up); the 256x256 faces are resized into the face box and
blended with the feathered lower-face mask. No disk I/O and no image encoding happen here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from livecam.audio.ring import AudioRing
from livecam.avatar import idle
from livecam.avatar.face import FaceRenderer
from livecam.avatar.model import Avatar
from livecam.engines.musetalk.avatar_latents import prepare_latents
from livecam.engines.musetalk.blend import DeviceBlender, faces_to_host, host_buffer
from livecam.engines.musetalk.forward import FastPaths, Forward, SharedForward, warm_shapes
from livecam.engines.musetalk.models import MuseTalkModels
from livecam.features.voice import VoiceGate
from livecam.features.whisper import WINDOW_STEPS, OfflineFeatures, StreamingFeatures

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class MuseTalkOptions:
    models_dir: Path | None = None  # None: $LIVECAM_MODELS_DIR or the user data dir
    device: str | None = None  # "cuda", "cpu", None: cuda when available
    features: str = "streaming"  # "streaming" (live) | "offline" (render: whole clip)
    tier: str = "full"  # "full" (VAE decoder) | "tiny" (TAESD)
    random_weights: bool = False  # full-size random models (benchmarks only)
    warmup: bool | None = None  # None: every batch shape on CUDA, batch 1 on CPU
    context_s: float = 8.0  # streaming encoder window
    batch_sizes: tuple[int, ...] = BATCH_SIZES  # the fixed shapes (the largest chunks a call)
    fast: FastPaths = field(default_factory=FastPaths.configured)
    voice_gate: bool = True  # False: every frame speaks (benchmarks of the worst case)


def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """(length, dim): sin on even channels, cos on odd, as MuseTalk's PositionalEncoding."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class MuseTalkEngine:
    name = "musetalk"
    response_s = 0.0  # not measured yet: it needs the real weights

    def __init__(
        self,
        avatar: Avatar,
        fps: float,
        models: MuseTalkModels,
        options: MuseTalkOptions | None = None,
        idle_motion: bool = True,
        forward: Forward | SharedForward | None = None,
    ) -> None:
        opts = options or MuseTalkOptions()
        self.options = opts
        self.batch_sizes = opts.batch_sizes
        self.fps, self.idle_motion, self.models = fps, idle_motion, models
        self.device, self.dtype = models.device, models.dtype
        self.warnings = models.warnings
        self.renderer = FaceRenderer(avatar)
        neutral = self.renderer.render(0.0, 0.0, 0.0)  # closed mouth, open eyes
        self.data = prepare_latents(
            avatar.name, neutral, avatar.landmarks, models.vae, models.vae_id
        )
        # the avatar's VAE latents on the device: every frame's UNet input starts from them
        self.latents = torch.from_numpy(self.data.latents).to(self.device, self.dtype)
        self._pe = positional_encoding(WINDOW_STEPS * 5, models.whisper.dim).to(self.device)
        self.forward = forward or Forward(models, opts.fast, opts.batch_sizes)
        x1, y1, x2, y2 = self.data.box
        self._rows, self._cols, self._size = slice(y1, y2), slice(x1, x2), (x2 - x1, y2 - y1)
        self._mask3 = np.repeat(self.data.mask, 3, axis=2)  # (h, w, 3) float32
        self.blender = (
            DeviceBlender(self.data.mask, self.device, opts.fast.pinned)
            if opts.fast.gpu_blend
            else None
        )
        self._staging = (  # page-locked landing place of the faces (without the GPU blend)
            host_buffer((self.batch_sizes[-1], 256, 256, 3), self.device, pinned=True)
            if opts.fast.pinned and not opts.fast.gpu_blend and self.device.type == "cuda"
            else None
        )
        self.gate = VoiceGate(fps)
        if opts.features == "offline":
            self.source: OfflineFeatures | StreamingFeatures = OfflineFeatures(models.whisper, fps)
        else:
            self.source = StreamingFeatures(models.whisper, fps, context_s=opts.context_s)
        self.tier = "full"
        self.set_tier(opts.tier)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # safe: every shape is one of BATCH_SIZES
        warm = opts.warmup if opts.warmup is not None else True
        if warm:
            self.warm_up(self.batch_sizes if self.device.type == "cuda" else (1,))

    def for_avatar(self, avatar: Avatar) -> MuseTalkEngine:
        """Shares the loaded models, their captured forward, the voice gate and the feature
        cache (all avatar-free); only the avatar's latents and mask are new."""
        opts = replace(self.options, tier=self.tier, warmup=False)
        other = MuseTalkEngine(avatar, self.fps, self.models, opts, self.idle_motion, self.forward)
        other.gate, other.source = self.gate, self.source
        return other

    @property
    def tiers(self) -> tuple[str, ...]:
        return ("full", "tiny") if self.models.taesd is not None else ("full",)

    def set_tier(self, name: str) -> None:
        if name not in self.tiers:
            raise ValueError(f"tier {name!r} not available here: choose one of {self.tiers}")
        self.tier = name

    def warm_up(self, sizes: Sequence[int]) -> None:
        """Runs (and on CUDA captures) every batch shape, so none is new while live."""
        tiers = self.tiers if self.device.type == "cuda" else (self.tier,)
        warm_shapes(self.forward, self.models, tiers, sizes)

    def samples_needed(self, frame: int) -> int:
        return max(self.source.samples_needed(frame), self.gate.samples_needed(frame))

    def model_inputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 50, D) float32 features -> the UNet's latents (B, 8, 32, 32) and conditioning."""
        cond = (feats + self._pe).to(self.dtype)
        return self.latents.expand(len(feats), -1, -1, -1), cond

    @torch.inference_mode()
    def faces_on_device(self, feats: torch.Tensor, tier: str | None = None) -> torch.Tensor:
        """(n, 50, D) features -> (n, 256, 256, 3) uint8 BGR faces on the device, in the
        forward's batch shapes (asynchronous on CUDA: nothing waits for the GPU here)."""
        return self.forward(*self.model_inputs(feats), tier or self.tier)

    def faces(self, feats: torch.Tensor) -> np.ndarray:
        """(n, 50, D) features -> (n, 256, 256, 3) uint8 BGR faces on the host."""
        return self._to_host(self.faces_on_device(feats))

    def _to_host(self, faces: torch.Tensor) -> np.ndarray:
        chunks = faces.split(self.batch_sizes[-1])  # the staging buffer holds one chunk
        return np.concatenate([faces_to_host(chunk, self._staging) for chunk in chunks])

    def base_frame(self, frame: int) -> np.ndarray:
        """The idle frame (closed mouth, blinks) that a generated face is pasted into."""
        eyes = idle.blink(frame / self.fps) if self.idle_motion else 0.0
        return self.renderer.render(0.0, 0.0, eyes, frame / self.fps)

    def paste(self, image: np.ndarray, face: np.ndarray, weight: float) -> None:
        """Blend a 256x256 face into the face box of `image` (in place)."""
        roi = image[self._rows, self._cols]
        face = cv2.resize(face, self._size, interpolation=cv2.INTER_LINEAR)
        mask = self._mask3 if weight >= 1.0 else self._mask3 * np.float32(weight)
        blended = roi + (face.astype(np.float32) - roi) * mask
        np.copyto(roi, blended + 0.5, casting="unsafe")  # rounds: values are >= 0

    def generate(self, ring: AudioRing, frames: Sequence[int]) -> list[np.ndarray]:
        weights = self.gate.levels(ring, frames) if self.options.voice_gate else [1.0] * len(frames)
        speaking = [k for k, w in zip(frames, weights, strict=True) if w > 0.0]
        faces = self.faces_on_device(self.source.features(ring, speaking)) if speaking else None
        images = [self.base_frame(k) for k in frames]  # on the CPU while the GPU runs the model
        if faces is None:
            return images
        spoken = [(image, w) for image, w in zip(images, weights, strict=True) if w > 0.0]
        if self.blender is not None:
            boxes = [image[self._rows, self._cols] for image, _ in spoken]
            self.blender.blend(faces, boxes, [w for _, w in spoken])
        else:
            host = self._to_host(faces)
            for (image, w), face in zip(spoken, host, strict=True):
                self.paste(image, face, w)
        return images

    def generate_silent(self, frames: Sequence[int]) -> list[np.ndarray]:
        return [self.base_frame(k) for k in frames]
