"""`livecam bench --engine musetalk --gpu-suite`: the neural engine on one GPU in minutes.

With full-size random weights (fp16 on CUDA): frames per second of the whole engine (streaming
features, UNet, decoder, blending, the frames back on the host) at batch 1/4/8/16, for the
full VAE and the tiny decoder, with every fast path on, all off, each one off alone, and the
opt-in compiled decoders on top; how far the fast paths' faces are from the plain path's;
peak memory; how many 25-fps streams one GPU holds (measured: that many engines generating at
once, each with its own audio and avatar data, sharing one model set), per tier and with the
compiled full VAE; and, given a checkout of the MuseTalk repository, its own real-time loop
on the same card and inputs. `--tiny` runs the same on toy-size models: a dry run for a CPU.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar
from livecam.avatar.store import load_avatar
from livecam.engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions
from livecam.engines.musetalk.forward import (
    MERGED_SIZES,
    FastPaths,
    Forward,
    SharedForward,
    warm_shapes,
)
from livecam.engines.musetalk.models import MuseTalkModels, random_models

log = logging.getLogger(__name__)

BATCHES = (1, 4, 8, 16)
STREAM_FPS = 25.0
STREAM_BATCH = 4  # live streams generate 4 frames (160 ms) a call
SWITCHES = ("cuda_graphs", "channels_last", "gpu_blend", "pinned")
LIVE_DEFAULT = "all_again"  # FastPaths(), what the engine runs, measured last (warmest)


def configurations() -> list[tuple[str, FastPaths]]:
    """Every default path on, all off, each one off alone, the opt-in compile on top, and every
    default path on again last: the two "all" rows bound the drift of a run (clocks, caches)
    that the comparisons sit in."""
    every = FastPaths()
    rows = [("all", every), ("none", FastPaths.none())]
    rows += [(f"no_{name}", replace(every, **{name: False})) for name in SWITCHES]
    return [*rows, ("all_compiled", replace(every, compile=True)), ("all_again", every)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _long_ring(audio: np.ndarray, seconds: float) -> AudioRing:
    """The speech repeated to `seconds`, all of it already 'arrived'."""
    reps = math.ceil(seconds * 16000 / len(audio))
    tiled = np.tile(audio, reps)
    ring = AudioRing(len(tiled) + 16000)
    ring.write(tiled)
    return ring


class Suite:
    def __init__(
        self, models: MuseTalkModels, avatar: Avatar, audio: np.ndarray, repeats: int,
        batches: tuple[int, ...] = BATCHES, context_s: float = 8.0,
    ) -> None:  # fmt: skip
        self.models, self.avatar, self.audio, self.repeats = models, avatar, audio, repeats
        self.device, self.batches, self.context_s = models.device, batches, context_s

    def engine(
        self,
        paths: FastPaths,
        forward: Forward | SharedForward | None = None,
        batches: tuple[int, ...] | None = None,
    ) -> MuseTalkEngine:
        opts = MuseTalkOptions(
            warmup=False, batch_sizes=batches or self.batches, fast=paths, voice_gate=False,
            context_s=self.context_s,
        )  # fmt: skip
        return MuseTalkEngine(self.avatar, STREAM_FPS, self.models, opts, forward=forward)

    def _fps(self, engine: MuseTalkEngine, ring: AudioRing, batch: int, start: int) -> float:
        """Frames per second of engine.generate on consecutive batches (after one warm-up)."""
        frames = lambda k: list(range(start + k * batch, start + (k + 1) * batch))  # noqa: E731
        engine.generate(ring, frames(0))  # captures the graph of this shape
        _sync(self.device)
        t0 = time.perf_counter()
        for k in range(1, self.repeats + 1):
            engine.generate(ring, frames(k))
        _sync(self.device)
        return batch * self.repeats / (time.perf_counter() - t0)

    def model_only(self) -> list[dict[str, Any]]:
        """fps of the bare forward (UNet + decoder, captured): the GPU's own ceiling."""
        engine = self.engine(FastPaths())
        feats = torch.zeros((1, 50, self.models.whisper.dim), device=self.device)
        rows = []
        for tier in engine.tiers:
            row: dict[str, Any] = {"paths": "model_only", "tier": tier}
            for b in self.batches:
                inputs = engine.model_inputs(feats.expand(b, -1, -1))
                engine.forward(*inputs, tier)
                _sync(self.device)
                t0 = time.perf_counter()
                for _ in range(self.repeats):
                    engine.forward(*inputs, tier)
                _sync(self.device)
                row[f"fps_b{b}"] = round(b * self.repeats / (time.perf_counter() - t0), 2)
            rows.append(row)
            log.info("gpu suite: %s", json.dumps(row))
        del engine
        self._release()
        return rows

    def table(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """fps per (fast paths, tier, batch), and the fast paths' faces against the plain ones."""
        ring = _long_ring(self.audio, 60)
        rows, faces = [], {}
        for name, paths in configurations():
            engine = self.engine(paths)
            for tier in engine.tiers:
                engine.set_tier(tier)
                row: dict[str, Any] = {"paths": name, "tier": tier}
                for b in self.batches:
                    try:
                        row[f"fps_b{b}"] = round(self._fps(engine, ring, b, start=50), 2)
                    except Exception as e:  # one failing path must not end the suite
                        row[f"fps_b{b}"], row["error"] = None, f"{type(e).__name__}: {e}"
                if engine.forward.graph_error:
                    row["graph_error"] = engine.forward.graph_error
                if engine.forward.compile_error:
                    row["compile_error"] = engine.forward.compile_error
                rows.append(row)
                log.info("gpu suite: %s", json.dumps(row))
                if name in ("all", "none"):
                    faces[(name, tier)] = engine.generate(ring, list(range(40, 44)))
            del engine
            self._release()
        return rows, self._agreement(faces)

    def _agreement(self, faces: dict) -> dict[str, Any]:
        out = {}
        for tier in {t for _, t in faces}:
            a, b = faces.get(("all", tier)), faces.get(("none", tier))
            if a is None or b is None:
                continue
            diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b))
            out[tier] = {
                "mean_abs_diff": round(float(diff.mean()), 4),
                "max_abs_diff": int(diff.max()),
            }
        return out

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def streams(
        self, tier: str, compile: bool = False, max_streams: int = 64, seconds: float = 3.0
    ) -> dict[str, Any]:
        """The most 25-fps streams generating at once, each at >= 25 fps in calls of 4 frames,
        their model calls merged into shared batches (up to 64 frames); `compile`: with the
        compiled decoders (CUDA)."""
        forward = Forward(self.models, replace(FastPaths(), compile=compile), MERGED_SIZES)
        shared = SharedForward(forward)
        try:
            single, held, tried = self._most_streams(shared, tier, max_streams, seconds)
        finally:
            shared.close()
        error = forward.compile_error
        del forward, shared
        self._release()  # the captured graphs' memory
        return {"tier": tier, "compiled": compile, "compile_error": error,
                "batch": STREAM_BATCH, "single_stream_fps": round(single, 1),
                "streams_held": held, "trials": tried}  # fmt: skip

    def _most_streams(
        self, shared: SharedForward, tier: str, max_streams: int, seconds: float
    ) -> tuple[float, int, dict[int, dict[str, Any]]]:
        """One stream's fps alone, then a bisection: the most streams held, every trial."""
        base = self.engine(FastPaths(), shared, (STREAM_BATCH,))  # calls of 4, never padded
        base.set_tier(tier)
        sizes = MERGED_SIZES if shared.forward.fixed_shapes else (1,)  # capture them all first
        warm_shapes(shared.forward, self.models, (tier,), sizes)
        single = self._fps(base, _long_ring(self.audio, 60), STREAM_BATCH, start=50)
        tried: dict[int, dict[str, Any]] = {}
        held, failed = 0, max_streams + 1  # bisect between the most held and the least failed
        n = max(1, min(max_streams, int(single // STREAM_FPS)))
        while held + 1 < failed and len(tried) < 6:
            tried[n] = self._concurrent(n, tier, shared, seconds)
            log.info("gpu suite: %s streams (%s): %s", n, tier, json.dumps(tried[n]))
            if tried[n]["holds"]:
                held = n
                n = min(2 * n, max_streams) if failed > max_streams else (n + failed) // 2
            else:
                failed = n
                n = (held + n) // 2
            if n in tried or n < 1:
                break
        return single, held, tried

    def _concurrent(
        self, n: int, tier: str, forward: SharedForward, seconds: float
    ) -> dict[str, Any]:
        forward.batches.clear()
        engines = [self.engine(FastPaths(), forward, (STREAM_BATCH,)) for _ in range(n)]
        rings = [_long_ring(self.audio, 60 + 10 * seconds) for _ in range(n)]
        counts, calls = [0] * n, [[] for _ in range(n)]
        stop = time.perf_counter() + seconds

        def stream(i: int) -> None:
            engines[i].set_tier(tier)
            k = 50 + 7 * i  # streams are not in step
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                engines[i].generate(rings[i], list(range(k, k + STREAM_BATCH)))
                calls[i].append(time.perf_counter() - t0)
                counts[i] += STREAM_BATCH
                k += STREAM_BATCH

        workers = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        fps = [c / wall for c in counts]
        p95 = float(np.percentile(np.concatenate([np.asarray(c) for c in calls]), 95))
        merged = float(np.median(forward.batches)) if forward.batches else 0.0
        return {"min_stream_fps": round(min(fps), 1), "aggregate_fps": round(sum(fps), 1),
                "call_p95_ms": round(p95 * 1e3, 1), "median_merged_batch": merged,
                "holds": min(fps) >= STREAM_FPS}  # fmt: skip


def _reference(suite: Suite, checkout: Path, tiny: bool) -> dict[str, Any]:
    from livecam.engines.musetalk.reference_loop import ReferenceInputs, run_reference
    from livecam.features.whisper import offline_features

    engine = suite.engine(FastPaths.none())
    feats = offline_features(suite.models.whisper, suite.audio, STREAM_FPS).float().cpu()
    frames = 200 if not tiny else 40
    feats = feats[np.arange(frames) % len(feats)]  # (n, 50, D)
    inputs = ReferenceInputs(suite.avatar.image, engine.data.box, engine.data.mask,
                             engine.latents, feats)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        return run_reference(checkout, suite.models, inputs, Path(tmp), tiny)


def _timed(label: str, fn: Callable[[], Any], log: dict[str, float]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    log[label] = round(time.perf_counter() - t0, 2)
    return out


def run_gpu_suite(
    avatar_name: str, audio_path: Path, device: str | None = None, tiny: bool = False,
    reference: Path | None = None, repeats: int | None = None,
    batches: tuple[int, ...] | None = None, stream_seconds: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The whole suite; `tiny` (a dry run) also takes fewer shapes, a 1 s whisper window and
    1 s stream trials, so a CPU gets through it in about a minute."""
    batches = batches or ((1, 4) if tiny else BATCHES)
    stream_seconds = stream_seconds or (1.0 if tiny else 3.0)
    seconds: dict[str, float] = {}
    models = _timed("load", lambda: random_models(device, tiny=tiny), seconds)
    dev = models.device
    suite = Suite(models, load_avatar(avatar_name), read_audio(audio_path),
                  repeats or (20 if dev.type == "cuda" else 1), batches,
                  1.0 if tiny else 8.0)  # fmt: skip
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    rows, agreement = _timed("table", suite.table, seconds)
    rows += _timed("model_only", suite.model_only, seconds)
    streams = [
        _timed(f"streams_{t}", lambda t=t: suite.streams(t, seconds=stream_seconds), seconds)
        for t in ("full", "tiny")
    ]
    # the full VAE is the limit, and its compiled decoder the lever (2.3x at batch 16)
    compiled = lambda: suite.streams("full", compile=True, seconds=stream_seconds)  # noqa: E731
    streams.append(_timed("streams_full_compiled", compiled, seconds))
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    ref = (
        _timed("reference", lambda: _reference(suite, reference, tiny), seconds)
        if reference
        else None
    )
    return {
        "engine": "musetalk",
        "suite": "gpu",
        "weights": "random (toy size)" if tiny else "random (full size)",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor(),
        "dtype": str(models.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "repeats": suite.repeats,
        "fps_table": rows,
        "fast_vs_plain_faces": agreement,
        "peak_cuda_memory_mb": None if peak is None else round(peak),
        "streams_25fps": streams,
        "reference_loop": ref,
        "speedup_vs_reference": None if ref is None else _speedups(rows, ref, batches),
        "seconds": seconds,
    }


def _speedups(rows: list[dict[str, Any]], ref: dict[str, Any], batches: tuple[int, ...]) -> dict:
    """livecam's best engine fps per tier, as it runs live, over the reference loop's."""
    out = {}
    for row in rows:
        if row["paths"] == LIVE_DEFAULT:
            fps, batch = max((row[f"fps_b{b}"] or 0.0, b) for b in batches)
            out[row["tier"]] = {"livecam_fps": fps, "livecam_batch": batch,
                                "reference_fps": ref["fps"], "reference_batch": ref["batch"],
                                "ratio": round(fps / ref["fps"], 2)}  # fmt: skip
    return out
