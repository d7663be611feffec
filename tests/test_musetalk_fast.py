"""The musetalk engine's fast paths on the CPU (toy-size random models): the device blend
against the cv2 one, channels_last against the plain layout, the shared forward that merges
several streams' calls, and the GPU suite's dry run. CUDA graphs and page-locked copies need a
GPU: the suite checks them there (its fast_vs_plain_faces)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions
from livecam.engines.musetalk.forward import (
    MERGED_SIZES,
    PLAIN_DECODERS,
    FastPaths,
    Forward,
    SharedForward,
    compiled_decoder,
)
from livecam.engines.musetalk.models import MuseTalkModels, random_models
from tests.conftest import JFK

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models() -> MuseTalkModels:
    return random_models("cpu", tiny=True)


def _engine(models: MuseTalkModels, paths: FastPaths, name: str = "astronaut") -> MuseTalkEngine:
    opts = MuseTalkOptions(warmup=False, fast=paths, voice_gate=False)
    return MuseTalkEngine(load_avatar(name), 25, models, opts)


def _ring() -> AudioRing:
    audio = read_audio(JFK)
    ring = AudioRing(len(audio) + 16_000)
    ring.write(audio)
    return ring


def test_device_blend_matches_the_cv2_blend(models: MuseTalkModels) -> None:
    engine = _engine(models, FastPaths())
    assert engine.blender is not None
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    weights = [1.0, 0.5, 0.0]
    by_cv2 = [engine.base_frame(k) for k in range(3)]
    on_device = [image.copy() for image in by_cv2]
    for image, face, w in zip(by_cv2, faces, weights, strict=True):
        engine.paste(image, face, w)
    boxes = [image[engine._rows, engine._cols] for image in on_device]
    engine.blender.blend(torch.from_numpy(faces), boxes, weights)
    for got, want in zip(on_device, by_cv2, strict=True):
        diff = np.abs(got.astype(int) - want)
        # cv2 interpolates 8-bit images with 11-bit fixed-point weights, torch in float: the
        # two resizes differ by a rounding step, which the blend's own rounding can double
        assert diff.max() <= 2 and diff.mean() < 0.05
    untouched = np.abs(on_device[2].astype(int) - engine.base_frame(2)).max()
    assert untouched == 0  # weight 0 leaves the frame as it was
    box = (engine._rows, engine._cols)
    assert np.abs(on_device[0][box].astype(int) - engine.base_frame(0)[box]).mean() > 10  # face in


def test_channels_last_gives_the_same_faces(models: MuseTalkModels) -> None:
    x = torch.randn(2, 8, 32, 32)
    cond = torch.randn(2, 50, models.whisper.dim)
    plain = Forward(models, FastPaths.none())(x, cond, "full")
    nhwc = Forward(models, FastPaths())(x, cond, "full")
    Forward(models, FastPaths.none())  # back to the plain layout for the other tests
    assert plain.shape == (2, 256, 256, 3) and plain.dtype == torch.uint8
    assert (plain.int() - nhwc.int()).abs().max() <= 1  # float summation order only


def test_compiled_decoders_give_the_same_faces(
    models: MuseTalkModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile's fused decoders (opt-in) at batch 1, 3 and 5: batch 1 compiles, and one
    more compile (a dynamic batch) serves a range of larger ones (the full VAE's: 2-15)."""
    plain = Forward(models, FastPaths.none())
    fused = Forward(models, FastPaths(channels_last=False, compile=True), compile_on_cpu=True)
    on_cpu = Forward(models, FastPaths(channels_last=False, compile=True))
    assert on_cpu._decoders is PLAIN_DECODERS  # CUDA's alone unless asked
    assert fused._decoders == {tier: compiled_decoder(tier) for tier in PLAIN_DECODERS}
    assert fused.fixed_shapes and not plain.fixed_shapes  # each compiled shape costs a compile
    graphs = counters["stats"]["unique_graphs"]
    for batch in (1, 3, 5):
        latents = torch.randn(batch, 4, 32, 32)
        for tier in ("full", "tiny"):
            want, got = plain.decode(latents, tier), fused.decode(latents, tier)
            assert got.shape == want.shape == (batch, 256, 256, 3)
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.01  # fusion reorders float math
        if batch == 3:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # batch 5: no compile of its own
    assert fused.compile_error is None
    assert not FastPaths.configured().compile
    monkeypatch.setenv("LIVECAM_TORCH_COMPILE", "1")
    assert MuseTalkOptions().fast.compile


def test_a_failing_compiler_leaves_the_plain_decoder(models: MuseTalkModels) -> None:
    fused = Forward(models, FastPaths(channels_last=False, compile=True), compile_on_cpu=True)

    def broken(decoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C compiler")

    fused._decoders = {"full": broken, "tiny": broken}
    latents = torch.randn(1, 4, 32, 32)
    want = Forward(models, FastPaths.none()).decode(latents, "full")
    assert torch.equal(fused.decode(latents, "full"), want)
    assert fused.compile_error == "RuntimeError: no C compiler"
    assert fused._decoders is PLAIN_DECODERS
    assert not fused.fixed_shapes


def test_engine_fast_and_plain_paths_agree(models: MuseTalkModels) -> None:
    ring, frames = _ring(), [40, 41, 42]
    fast = _engine(models, FastPaths(channels_last=False)).generate(ring, frames)
    plain = _engine(models, FastPaths.none()).generate(ring, frames)
    for a, b in zip(fast, plain, strict=True):
        diff = np.abs(a.astype(int) - b)
        assert diff.max() <= 2 and diff.mean() < 0.05  # the resize rounding above


class _HeldForward:
    """The real forward, held on its first call until the test lets it go."""

    graph_error = compile_error = None

    def __init__(self, forward: Forward) -> None:
        self.forward, self.calls, self.device = forward, [], forward.device
        self.sizes = forward.sizes
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> torch.Tensor:
        self.calls.append(len(latents))
        self.entered.set()
        self.release.wait(30)
        return self.forward(latents, cond, tier)


@pytest.mark.parametrize("fixed", [False, True], ids=["cpu", "captured-shapes"])
def test_shared_forward_merges_streams_and_keeps_their_faces_apart(
    models: MuseTalkModels, monkeypatch: pytest.MonkeyPatch, fixed: bool
) -> None:
    if fixed:  # as where CUDA graphs capture each shape: merged batches are padded
        monkeypatch.setattr(Forward, "fixed_shapes", property(lambda _self: True))
    forward = Forward(models, FastPaths.none(), MERGED_SIZES)
    held = _HeldForward(forward)
    shared = SharedForward(held)  # type: ignore[arg-type]
    torch.manual_seed(1)
    requests = [(torch.randn(n, 8, 32, 32), torch.randn(n, 50, models.whisper.dim)) for n in
                (4, 4, 2, 4)]  # fmt: skip
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        results[i] = shared(*requests[i], "full")

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert held.entered.wait(30)  # request 0 runs alone; the others arrive meanwhile
    others = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in others:
        t.start()
    while sum(len(r.latents) for r in shared._pending) < 10:
        threading.Event().wait(0.01)
    seen: list[int] = []
    hook = models.unet.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    try:
        held.release.set()
        for t in [first, *others]:
            t.join(60)
    finally:
        hook.remove()
    assert held.calls == [4, 10]  # 4 + 4 + 2 = 10 frames merged into one call
    assert list(shared.batches) == [4, 10]
    assert seen[-1] == (12 if fixed else 10)  # padded to the next step of 4, or not at all
    for i, (x, cond) in enumerate(requests):
        alone = forward(x, cond, "full")
        assert results[i].shape == alone.shape  # each caller gets exactly its own frames
        assert (results[i].int() - alone.int()).abs().max() <= 1


def test_a_call_longer_than_the_largest_shape_runs_in_chunks(models: MuseTalkModels) -> None:
    forward = Forward(models, FastPaths.none(), (1, 2, 4))
    shared = SharedForward(forward)
    x, cond = torch.randn(6, 8, 32, 32), torch.randn(6, 50, models.whisper.dim)
    seen: list[int] = []
    hook = models.unet.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    try:
        faces = shared(x, cond, "full")
    finally:
        hook.remove()
    assert faces.shape == (6, 256, 256, 3) and seen == [4, 2]
    for k in (0, 5):
        alone = forward(x[k : k + 1], cond[k : k + 1], "full")[0]
        assert (faces[k].int() - alone.int()).abs().max() <= 1


def test_shared_forward_hands_errors_to_the_caller(models: MuseTalkModels) -> None:
    shared = SharedForward(Forward(models, FastPaths.none()))
    with pytest.raises(RuntimeError):
        shared(torch.randn(1, 3, 32, 32), torch.randn(1, 50, models.whisper.dim), "full")
    x, cond = torch.randn(1, 8, 32, 32), torch.randn(1, 50, models.whisper.dim)
    assert shared(x, cond, "full").shape == (1, 256, 256, 3)  # still serving


def test_a_closed_shared_forward_ends_its_thread_and_refuses_calls(
    models: MuseTalkModels,
) -> None:
    shared = SharedForward(Forward(models, FastPaths.none()))
    x, cond = torch.randn(2, 8, 32, 32), torch.randn(2, 50, models.whisper.dim)
    assert shared(x, cond, "full").shape == (2, 256, 256, 3)
    shared.close()
    assert not shared._thread.is_alive()  # it held the Forward (and its graphs) for good
    with pytest.raises(RuntimeError, match="closed"):
        shared(x, cond, "full")


def test_gpu_suite_dry_run_on_the_cpu() -> None:
    from livecam.engines.musetalk.gpu_suite import configurations, run_gpu_suite

    report = run_gpu_suite("astronaut", JFK, "cpu", tiny=True, batches=(1, 2),
                           stream_seconds=0.5)  # fmt: skip
    rows = report["fps_table"]
    names = [name for name, _ in configurations()] + ["model_only"]
    assert sorted({r["paths"] for r in rows}) == sorted(names)
    assert all(r["fps_b1"] > 0 and r["fps_b2"] > 0 for r in rows), rows
    for tier in ("full", "tiny"):
        assert report["fast_vs_plain_faces"][tier]["max_abs_diff"] <= 2
    streams = report["streams_25fps"]
    assert [(s["tier"], s["compiled"]) for s in streams] == [
        ("full", False),
        ("tiny", False),
        ("full", True),
    ]
    assert all(s["compile_error"] is None for s in streams)
    assert all(s["trials"] and s["streams_held"] >= 0 for s in streams)
    # a CPU holds no 25-fps stream, so one stream is tried: its calls are 4 frames, unpadded
    assert all(s["trials"][1]["median_merged_batch"] == 4.0 for s in streams)
    assert report["reference_loop"] is None
