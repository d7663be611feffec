"""`livecam bench --engine musetalk`: per-stage times, fps per batch size, peak memory, the
whole engine against the bare UNet + decoder forward on the same inputs, and how far the live
whisper features are from MuseTalk's offline ones on the bench audio."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions
from livecam.engines.musetalk.manifest import default_models_dir, has_component
from livecam.engines.musetalk.models import load_models, random_models
from livecam.features.voice import VoiceGate
from livecam.features.whisper import offline_features, streaming_deviation

BATCHES = (1, 4, 8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """(mean seconds per call, last result)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats, result


def _speaking_run(audio: np.ndarray, fps: float, ring: AudioRing, need: int) -> list[int]:
    """Start of consecutive frames that the voice gate fully opens (the model runs on all)."""
    gate = VoiceGate(fps)
    n = int(len(audio) / 16000 * fps)
    levels = gate.levels(ring, list(range(n)))
    for k in range(n - need):
        if all(v >= 1.0 for v in levels[k : k + need]):
            return list(range(k, k + need))
    raise ValueError("the bench audio has no stretch of speech long enough")


def _stages(engine: MuseTalkEngine, ring: AudioRing, frames: list[int], repeats: int) -> dict:
    dev, b, fwd = engine.device, len(frames), engine.forward
    ms = 1e3 / b  # seconds per batch -> ms per frame
    feats_s, feats = _timed(lambda: engine.source.features(ring, frames), dev, 1)
    latents, cond = engine.model_inputs(feats)
    with torch.inference_mode():
        unet_s, lat = _timed(lambda: fwd.unet(latents, cond), dev, repeats)
        dec_s, img = _timed(lambda: fwd.decode(lat, "full"), dev, repeats)
        tiny_s = None
        if "tiny" in engine.tiers:
            tiny_s, _ = _timed(lambda: fwd.decode(lat, "tiny"), dev, repeats)
        faces = img.cpu().numpy()
        bases = [engine.base_frame(k) for k in frames]
        blend_s, _ = _timed(
            lambda: [engine.paste(x, f, 1.0) for x, f in zip(bases, faces, strict=True)], dev, 1
        )
        bare_s, _ = _timed(lambda: fwd.decode(fwd.unet(latents, cond), "full"), dev, repeats)
    # the whole engine on fresh frames: gate, streaming features, model, transfer, blend
    later = [k + b * (repeats + 2) for k in frames]
    engine.set_tier("full")
    eng_s, _ = _timed(lambda: engine.generate(ring, later), dev, 1)
    row = {
        "batch": b,
        "features_ms": round(feats_s * ms, 3),
        "unet_ms": round(unet_s * ms, 3),
        "decode_ms": round(dec_s * ms, 3),
        "decode_tiny_ms": None if tiny_s is None else round(tiny_s * ms, 3),
        "blend_ms": round(blend_s * ms, 3),
        "bare_forward_ms": round(bare_s * ms, 3),
        "engine_ms": round(eng_s * ms, 3),
        "fps_full": round(b / eng_s, 2),
        "fps_tiny_model_only": None if tiny_s is None else round(b / (unet_s + tiny_s), 2),
        "engine_overhead_pct": round((eng_s / bare_s - 1) * 100, 1),
    }
    return row


def _peak_memory(device: torch.device) -> dict[str, float]:
    out = {"process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def run_musetalk_bench(
    avatar_name: str,
    audio_path: Path,
    fps: float,
    models_dir: Path | None = None,
    device: str | None = None,
    random_weights: bool = False,
    batches: tuple[int, ...] = BATCHES,
    repeats: int | None = None,
) -> dict[str, Any]:
    audio = read_audio(audio_path)
    avatar = load_avatar(avatar_name)
    t0 = time.perf_counter()
    root = models_dir or default_models_dir()
    if random_weights:  # a whisper in an explicit --models-dir is used (real weights)
        models = random_models(device, whisper_dir=models_dir)
    else:
        models = load_models(root, device)
    load_s = time.perf_counter() - t0
    engine = MuseTalkEngine(avatar, fps, models, MuseTalkOptions(warmup=False))
    dev = models.device
    repeats = repeats or (20 if dev.type == "cuda" else 1)
    ring = AudioRing(len(audio) + 16000)
    ring.write(audio)
    ring.write(np.zeros(16000, np.float32))
    offline_s, _ = _timed(lambda: offline_features(models.whisper, audio, fps), dev, 1)
    # live vs MuseTalk's features, at calls of 4 frames (a middle batch size)
    deviation = streaming_deviation(models.whisper, audio, fps, batch=4)
    warm_s, _ = _timed(lambda: engine.warm_up(batches), dev, 1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    need = max(batches) * (repeats + 3)
    first = _speaking_run(audio, fps, ring, need)[0]
    rows = [_stages(engine, ring, list(range(first, first + b)), repeats) for b in batches]
    return {
        "engine": "musetalk",
        "weights": "random (full size)"
        if random_weights
        else str(models_dir or default_models_dir()),
        "whisper": str(root / "whisper")
        if not random_weights or (models_dir and has_component(models_dir, "whisper"))
        else "random",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor(),
        "dtype": str(models.dtype).replace("torch.", ""),
        "fps": fps,
        "repeats": repeats,
        "load_seconds": round(load_s, 2),
        "warmup_seconds": round(warm_s, 2),
        "features_offline_seconds": round(offline_s, 3),
        "features_offline_audio_seconds": round(len(audio) / 16000, 2),
        "streaming_encoder_runs": engine.source.encoder_runs,
        "streaming_feature_deviation": deviation,
        "stages_ms_per_frame": rows,
        "peak_memory": _peak_memory(dev),
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
