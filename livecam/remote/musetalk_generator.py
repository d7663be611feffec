"""Stateless musetalk generation for the server: several streams' frames in one forward pass.

Each request brings its audio window (the stream's recent audio, absolute start index) and
its frames' voice weights; the whisper features are encoded from that window per call (the
windows of all merged requests in one batch), so no per-stream state lives on a replica.
Unlike a local engine, the log-mel clamp uses the window's own peak (a local stream keeps a
running peak over whisper's 30 s segment): features can differ slightly from a local run.
Imports torch: server side only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar
from livecam.engines.musetalk.blend import faces_to_host
from livecam.engines.musetalk.engine import BATCH_SIZES, MuseTalkEngine, MuseTalkOptions
from livecam.engines.musetalk.forward import MERGED_SIZES, FastPaths, Forward, warm_shapes
from livecam.engines.musetalk.manifest import default_models_dir
from livecam.engines.musetalk.models import load_models, random_models
from livecam.features.voice import VoiceGate
from livecam.features.whisper import StreamingFeatures, features_together
from livecam.remote.generator import EngineInfo, PreparedEngines, RenderRequest, RenderResult

PREPARED_AVATARS = 16  # per replica: latents, mask and a lite renderer each
# a merged call's forward runs in chunks of at most 32 frames (on an H200 the full VAE takes
# about 140 ms for 32), each padded to one of these shapes where shapes are captured
POOL_SIZES = tuple(size for size in MERGED_SIZES if size <= 32)


class MuseTalkGenerator:
    def __init__(
        self, models_dir: Path | None, device: str | None = None, random_weights: str | None = None
    ) -> None:
        if random_weights:  # "full" | "tiny"; a whisper in an explicit models_dir is used
            tiny = random_weights == "tiny"
            self.models = random_models(device, tiny=tiny, whisper_dir=models_dir)
        else:
            self.models = load_models(models_dir or default_models_dir(), device)
        # the host blend: only the face box leaves the replica, composed on the CPU
        paths = replace(FastPaths.configured(), gpu_blend=False, pinned=False)
        self.forward = Forward(self.models, paths, POOL_SIZES)
        self.options = MuseTalkOptions(warmup=False, fast=paths)
        tiers = ("full", "tiny") if self.models.taesd is not None else ("full",)
        self.info = EngineInfo("musetalk", tiers, BATCH_SIZES, MuseTalkEngine.response_s)
        self._engines: PreparedEngines[MuseTalkEngine] = PreparedEngines(PREPARED_AVATARS)
        if self.models.device.type == "cuda":
            self.warm_up()

    def warm_up(self) -> None:
        """Every merged batch shape of every tier, before the first stream comes, so no
        stream's call waits for a capture."""
        warm_shapes(self.forward, self.models, self.info.tiers, POOL_SIZES)

    def samples_needed(self, fps: float) -> Callable[[int], int]:
        features = StreamingFeatures(self.models.whisper, fps, context_s=self.options.context_s)
        gate = VoiceGate(fps)
        return lambda k: max(features.samples_needed(k), gate.samples_needed(k))

    def has(self, request: RenderRequest) -> bool:
        return request in self._engines

    def prepare(self, request: RenderRequest, avatar: Avatar) -> None:
        engine = MuseTalkEngine(avatar, request.fps, self.models, self.options, request.idle,
                                forward=self.forward)  # fmt: skip
        self._engines.add(request, engine)

    def _feature_job(self, request: RenderRequest, frames: list[int]) -> tuple:
        """What `features_together` needs for one request: a source, its audio, its frames."""
        audio = request.audio if request.audio is not None else np.zeros(0, np.float32)
        ring = AudioRing(max(len(audio), 1))
        ring.write_silence(request.audio_start)
        ring.write(audio)
        source = StreamingFeatures(self.models.whisper, request.fps,
                                   context_s=self.options.context_s)  # fmt: skip
        return source, ring, frames

    @torch.inference_mode()
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        t0 = time.perf_counter()
        engines = [self._engines.get(request) for request in requests]
        launched = self._launch(requests, engines)
        # the idle frames are drawn on the CPU while the GPU makes the faces
        images = [engine.generate_silent(request.frames)
                  for request, engine in zip(requests, engines, strict=True)]  # fmt: skip
        faces: dict[int, list[np.ndarray]] = {id(request): [] for request in requests}
        for on_device, rows in launched:
            host = faces_to_host(on_device)
            start = 0
            for key, n in rows:
                faces[key] += list(host[start : start + n])
                start += n
        out = []
        for request, engine, frames in zip(requests, engines, images, strict=True):
            box = engine.data.box
            regions = [(box[0], box[1], box[2] - box[0], box[3] - box[1])]
            if not engine.renderer.avatar.is_video:
                eyes = engine.renderer.avatar.eyes
                regions.append((eyes.x, eyes.y, *eyes.size))
            patches = []
            for image, (weight, *_) in zip(frames, request.conditions, strict=True):
                if weight > 0.0:
                    engine.paste(image, faces[id(request)].pop(0), weight)
                patches.append(tuple((x, y, image[y : y + h, x : x + w]) for x, y, w, h in regions))
            out.append(tuple(patches))
        seconds = time.perf_counter() - t0
        n_frames = sum(len(r.frames) for r in requests)
        return [RenderResult(r.stream, r.frames, p, len(requests), n_frames, seconds)
                for r, p in zip(requests, out, strict=True)]  # fmt: skip

    def _launch(
        self, requests: list[RenderRequest], engines: list[MuseTalkEngine]
    ) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """The faces of every speaking frame, one forward per tier, on the device (on CUDA
        still being made), each with its requests' ids and face counts in order."""
        by_tier: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        speaking = []  # every request's windows go through the encoder together
        for request, engine in zip(requests, engines, strict=True):
            frames = [k for k, c in zip(request.frames, request.conditions, strict=True)
                      if c[0] > 0.0]  # fmt: skip
            if frames:
                speaking.append((request, engine, self._feature_job(request, frames)))
        features = features_together([job for _, _, job in speaking])
        for (request, engine, _), feats in zip(speaking, features, strict=True):
            latents, cond = engine.model_inputs(feats)
            by_tier.setdefault(request.tier, []).append((id(request), latents, cond))
        launched = []
        for tier, rows in by_tier.items():
            latents = torch.cat([lat for _, lat, _ in rows])
            cond = torch.cat([c for _, _, c in rows])
            launched.append((self.forward(latents, cond, tier), [(k, len(x)) for k, x, _ in rows]))
        return launched
