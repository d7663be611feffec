"""The musetalk engine with tiny random weights through the real loaders: shapes,
determinism, silence gating, batch padding, tiers, render and bench."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.cli import app
from livecam.engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions, positional_encoding
from livecam.engines.musetalk.forward import Forward
from livecam.engines.musetalk.models import load_models
from livecam.live import LiveOptions, build_pipeline, run
from livecam.session import build_engine
from tests import fake_camera
from tests.conftest import JFK
from tests.helpers import probe, write_clip
from tests.musetalk_tiny import publish_tiny_hashes, tiny_models_dir


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_models_dir()


@pytest.fixture(scope="module")
def engine(tiny: Path) -> MuseTalkEngine:
    return build_engine("musetalk", load_avatar("astronaut"), 25, options=MuseTalkOptions(tiny))


def _ring(audio: np.ndarray) -> AudioRing:
    ring = AudioRing(len(audio) + 32_000)
    ring.write(audio)
    ring.write(np.zeros(32_000, np.float32))
    return ring


def test_positional_encoding() -> None:
    pe = positional_encoding(50, 384)
    assert pe.shape == (50, 384)
    assert float(pe[0, 0]) == 0.0 and float(pe[0, 1]) == 1.0  # sin(0), cos(0)
    assert abs(float(pe[3, 2]) - np.sin(3 * np.exp(-2 * np.log(10000) / 384))) < 1e-6


def test_generate_shapes_determinism_and_speech_changes_the_mouth(
    engine: MuseTalkEngine, tiny: Path
) -> None:
    audio = read_audio(JFK)
    avatar = load_avatar("astronaut")
    frames = list(range(20, 25))
    faces = engine.generate(_ring(audio), frames)
    assert len(faces) == len(frames)
    assert all(f.shape == avatar.image.shape and f.dtype == np.uint8 for f in faces)
    assert len({id(f) for f in faces}) == len(faces)  # each a new array
    neutral = engine.generate_silent(frames)[0]
    x1, y1, x2, y2 = engine.data.box
    lower = slice((y1 + y2) // 2, y2), slice(x1, x2)
    assert np.abs(faces[0][lower].astype(int) - neutral[lower]).mean() > 1.0
    outside = faces[0].copy()
    outside[y1:y2, x1:x2] = neutral[y1:y2, x1:x2]
    assert np.array_equal(outside, neutral)  # only the face box is touched
    again = build_engine("musetalk", avatar, 25, options=MuseTalkOptions(tiny, warmup=False))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(faces, again.generate(_ring(audio), frames), strict=True)
    )


def test_silence_keeps_the_closed_neutral_face(engine: MuseTalkEngine) -> None:
    silence = np.zeros(16_000 * 3, np.float32)
    frames = [30, 31, 32]
    faces = engine.generate(_ring(silence), frames)
    for face, idle in zip(faces, engine.generate_silent(frames), strict=True):
        assert np.array_equal(face, idle)


def _unet_batches(engine: MuseTalkEngine, calls: list[list[int]]) -> tuple[list[int], list]:
    seen: list[int] = []
    unet = engine.models.unet
    handle = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        faces = [engine.generate(_ring(read_audio(JFK)), frames) for frames in calls]
    finally:
        handle.remove()
    return seen, faces


def test_batches_are_padded_to_fixed_shapes_only_where_shapes_are_captured(
    engine: MuseTalkEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [[40, 42, 44], list(range(50, 61))]  # strided frames; 11 frames: 8 + 3
    assert not engine.forward.fixed_shapes  # a CPU captures nothing: padding is wasted work
    seen, plain = _unet_batches(engine, calls)
    assert seen == [3, 8, 3]
    monkeypatch.setattr(Forward, "fixed_shapes", property(lambda _self: True))
    seen, padded = _unet_batches(engine, calls)
    assert seen == [4, 8, 4]  # the last frame repeated up to a shape of (1, 2, 4, 8)
    for a, b in zip(np.concatenate(plain), np.concatenate(padded), strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1  # other batch shapes: float rounding


def test_tiers(engine: MuseTalkEngine) -> None:
    """tiny decodes with TAESD: another face in the box, the same frame outside it; going
    back to full gives the full decoder's faces again."""
    assert engine.tiers == ("full", "tiny")
    ring, frames = _ring(read_audio(JFK)), [70, 71]
    full = engine.generate(ring, frames)
    engine.set_tier("tiny")
    try:
        tiny = engine.generate(ring, frames)
    finally:
        engine.set_tier("full")
    x1, y1, x2, y2 = engine.data.box
    for a, b in zip(full, tiny, strict=True):
        assert b.dtype == np.uint8 and b.shape == a.shape
        assert np.abs(a[y1:y2, x1:x2].astype(int) - b[y1:y2, x1:x2]).mean() > 1.0
        outside = b.copy()
        outside[y1:y2, x1:x2] = a[y1:y2, x1:x2]
        assert np.array_equal(outside, a)
    again = engine.generate(ring, frames)
    assert all(np.array_equal(a, b) for a, b in zip(full, again, strict=True))
    with pytest.raises(ValueError):
        engine.set_tier("ultra")


def test_half_precision_path(tiny: Path, engine: MuseTalkEngine) -> None:
    """The CUDA path's fp16 models and dtype handoffs, exercised on the CPU."""
    models = load_models(tiny, "cpu", dtype=torch.float16)
    half = MuseTalkEngine(load_avatar("astronaut"), 25, models, MuseTalkOptions(warmup=False))
    ring = _ring(read_audio(JFK))
    for tier in half.tiers:
        half.set_tier(tier)
        engine.set_tier(tier)
        try:
            got, want = half.generate(ring, [70, 71]), engine.generate(ring, [70, 71])
        finally:
            engine.set_tier("full")
        box = (engine._rows, engine._cols)
        diff = np.abs(got[0][box].astype(int) - want[0][box].astype(int))
        assert diff.max() > 0 and diff.mean() < 1.0, (tier, diff.mean())  # fp16 rounding only


def test_avatar_latents_are_cached(tiny: Path, engine: MuseTalkEngine) -> None:
    from livecam.avatar.store import avatar_dir

    assert (avatar_dir("astronaut") / "musetalk.npz").is_file()
    assert engine.data.latents.shape == (1, 8, 32, 32)
    x1, y1, x2, y2 = engine.data.box
    assert engine.data.mask.shape == (y2 - y1, x2 - x1, 1)
    models = load_models(tiny)
    again = MuseTalkEngine(load_avatar("astronaut"), 25, models, MuseTalkOptions(warmup=False))
    assert np.array_equal(again.data.latents, engine.data.latents)


def test_live_camera_with_musetalk_keeps_its_rate(tiny: Path, tmp_path: Path, fake_cam) -> None:
    clip = write_clip(tmp_path / "a.wav", read_audio(JFK)[: 2 * 16_000])
    opts = LiveOptions(avatar="astronaut", engine="musetalk", models_dir=tiny, sink="virtualcam",
                       camera_backend=fake_camera.FAKE, audio_file=clip, width=320, height=240,
                       fps=25, dashboard=False)  # fmt: skip
    assert run(opts, Console(file=io.StringIO())) == 0
    (cam,) = fake_camera.FakeBackend.instances
    span = cam.times[-1] - cam.times[0]  # paced by the clock: never faster, one per tick
    assert span >= 2.0 - 1 / 25 and len(cam.frames) <= span * 25 + 2
    assert len({hash(f.tobytes()) for f in cam.frames}) > 10  # the face moves


def test_unpublished_weights_are_used_and_shown_as_a_warning(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, fake_cam
) -> None:
    opts = LiveOptions(avatar="astronaut", engine="musetalk", models_dir=tiny, sink="virtualcam",
                       camera_backend=fake_camera.FAKE, width=320, height=240, fps=25,
                       audio_file=JFK, dashboard=False)  # fmt: skip
    pipeline = build_pipeline(opts)
    pipeline.sink.close()
    warnings = pipeline.snapshot().warnings
    assert any("musetalkV15/unet.pth is not the published release" in w for w in warnings)
    assert any("livecam models verify" in w for w in warnings)
    publish_tiny_hashes(monkeypatch, tiny)
    assert load_models(tiny).warnings == ()


def test_for_avatar_shares_models_and_audio_state(engine: MuseTalkEngine) -> None:
    portrait = load_avatar("portrait")
    other = engine.for_avatar(portrait)
    assert other.models is engine.models and other.source is engine.source
    assert other.gate is engine.gate and other.tier == engine.tier
    assert not np.array_equal(other.data.latents, engine.data.latents)
    faces = other.generate(_ring(read_audio(JFK)), [70, 71])
    assert faces[0].shape == portrait.image.shape


def test_render_cli_with_musetalk(tiny: Path, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "a.wav", read_audio(JFK)[:16_000])
    out = tmp_path / "m.mp4"
    args = ["render", "--engine", "musetalk", "--models-dir", str(tiny), "--audio", str(clip)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--size", "320x240", "--fps", "25"])
    assert result.exit_code == 0, result.output
    streams = {s["codec_type"]: s for s in probe(out)["streams"]}
    assert int(streams["video"]["nb_frames"]) == 25 and "audio" in streams


def test_bench_json_has_stage_keys(tiny: Path) -> None:
    from livecam.bench import run_bench

    report = run_bench("musetalk", "astronaut", None, 25, 320, 240, models_dir=tiny)
    rows = report["stages_ms_per_frame"]
    assert [r["batch"] for r in rows] == [1, 4, 8]
    for key in ("features_ms", "unet_ms", "decode_ms", "decode_tiny_ms", "blend_ms",
                "bare_forward_ms", "engine_ms", "fps_full", "engine_overhead_pct"):  # fmt: skip
        assert all(isinstance(r[key], float) for r in rows), key
    for r in rows:  # the derived figures agree with the measured ones (rounding aside)
        assert r["fps_full"] == pytest.approx(1e3 / r["engine_ms"], rel=1e-3, abs=0.006)
        overhead = (r["engine_ms"] / r["bare_forward_ms"] - 1) * 100
        assert r["engine_overhead_pct"] == pytest.approx(overhead, abs=0.5)
        assert r["fps_tiny_model_only"] == pytest.approx(
            1e3 / (r["unet_ms"] + r["decode_tiny_ms"]), rel=1e-3, abs=0.006
        )
    assert "process_max_rss_mb" in report["peak_memory"]
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    deviation = report["streaming_feature_deviation"]
    n = math.floor(len(read_audio(JFK)) / 16_000 * 25)
    assert deviation["frames"] == n and len(deviation["per_state_relative_l2"]) == 5
    per_state = deviation["per_state_relative_l2"]
    # the ratio of the summed squares lies within the per-state ratios (4 decimals kept)
    assert 0 < deviation["relative_l2"] <= max(per_state) + 1e-4
