"""render_audio generates on a worker thread while the sink takes frames: frames arrive in
order and complete, and a failure on either side ends the render instead of hanging it."""

from __future__ import annotations

import numpy as np
import pytest

from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.session import build_compositor, build_engine, render_audio
from livecam.sinks.memory import MemorySink


class _RecordingSink(MemorySink):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(160, 120, 25)
        self.indices: list[int] = []
        self.fail_at = fail_at

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        if len(self.indices) == self.fail_at:
            raise OSError("disk full")
        self.indices.append(int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1]))  # stamped below
        super().send(frame, audio)


def _parts():
    avatar = load_avatar("astronaut")
    comp = build_compositor(avatar, 160, 120, 25)
    compose = comp.compose

    def stamped(face: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
        canvas = compose(face, k, out)
        canvas[0, 0, :2] = (k % 256, k // 256)
        return canvas

    comp.compose = stamped
    return build_engine("lite", avatar, 25), comp


def test_frames_arrive_in_order_and_complete() -> None:
    audio = np.random.default_rng(0).normal(0, 0.1, 16_000 * 2).astype(np.float32)
    engine, comp = _parts()
    sink = _RecordingSink()
    result = render_audio(audio, engine, comp, sink, batch=4)
    assert result.frames == 50 and sink.frames_sent == 50 and sink.indices == list(range(50))
    assert len(result.frame_ms) == 50
    assert sink.audio_samples == len(audio)  # every frame's audio slice, none twice


def test_a_failing_sink_or_engine_ends_the_render() -> None:
    audio = np.zeros(16_000 * 3, np.float32)
    engine, comp = _parts()
    with pytest.raises(OSError, match="disk full"):
        render_audio(audio, engine, comp, _RecordingSink(fail_at=5), batch=4)

    def broken(ring, frames):
        raise RuntimeError("engine broke")

    engine, comp = _parts()
    engine.generate = broken
    with pytest.raises(RuntimeError, match="engine broke"):
        render_audio(audio, engine, comp, _RecordingSink(), batch=4)


def test_canvases_are_reused_only_once_the_sink_is_done_with_them() -> None:
    avatar = load_avatar("portrait")
    audio = np.random.default_rng(2).normal(0, 0.1, 16_000 * 2).astype(np.float32)
    comp = build_compositor(avatar, 320, 240, 25)
    canvases: list[np.ndarray] = []  # every canvas sent (so no id is reused)

    class Keeping(MemorySink):  # keeps a copy of every frame, as it arrives
        def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
            canvases.append(frame)
            super().send(frame, audio)

    sink = Keeping(320, 240, 25, keep=100)
    render_audio(audio, build_engine("lite", avatar, 25), comp, sink, batch=4)
    engine = build_engine("lite", avatar, 25)
    ring = AudioRing(len(audio) + 16_000)
    ring.write(np.concatenate([audio, np.zeros(16_000, np.float32)]))
    faces = engine.generate(ring, range(50))
    want = [build_compositor(avatar, 320, 240, 25).compose(f, k) for k, f in enumerate(faces)]
    assert len(sink.frames) == 50
    for k, (got, expected) in enumerate(zip(sink.frames, want, strict=True)):
        assert np.array_equal(got, expected), k  # no frame overwritten before it was sent
    assert len({id(c) for c in canvases}) <= 2 * 4 + 2  # drawn into again, not one a frame
