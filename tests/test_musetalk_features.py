"""whisper features: offline vs an independent implementation of MuseTalk's definition,
streaming deviation, and the `livecam features` command (tiny random whisper)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from livecam.audio.files import read_audio
from livecam.cli import app
from livecam.musetalk.features import (
    compute_features,
    frame_steps,
    offline_features,
    streaming_deviation,
    streaming_features,
    whisper_from_dir,
)
from tests.conftest import JFK
from tests.musetalk_tiny import tiny_models_dir
from tests.whisper_reference import reference_features, rel_l2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models_dir(tmp_path_factory)


def test_frame_window_matches_musetalk_at_25fps() -> None:
    assert frame_steps(0, 25) == (-4, 6)  # 80 ms before frame 0 to 80 ms after it ends
    assert frame_steps(10, 25) == (16, 26)


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_offline_matches_independent_reference(tiny: Path, fps: float) -> None:
    jfk = read_audio(JFK)
    audio = np.concatenate([jfk, jfk, jfk[: 16_000 * 10]]) if fps == 25 else jfk  # > 30 s
    ours = compute_features(tiny, audio, fps, streaming=False, device="cpu")
    ref = reference_features(tiny, audio, fps)
    assert ours.shape == ref.shape == (math.floor(len(audio) / 16_000 * fps), 50, 384)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - ref).max()) <= 1e-5


def test_streaming_stays_close_to_offline(tiny: Path) -> None:
    jfk = read_audio(JFK)
    audio = np.concatenate([jfk, jfk])  # 22 s: longer than the 8 s window, which must slide
    whisper = whisper_from_dir(tiny, "cpu")
    n = math.floor(len(audio) / 16_000 * 25)
    offline = offline_features(whisper, audio, 25, n).numpy()
    live = streaming_features(whisper, audio, 25, n, batch=8)
    assert live.shape == offline.shape
    # the padding steps before the clip are exact zeros in both
    assert np.array_equal(live[0, :20], offline[0, :20])
    report = streaming_deviation(whisper, audio, 25, batch=8)
    assert report["relative_l2"] == pytest.approx(rel_l2(live, offline), abs=1e-4)
    assert len(report["per_state_relative_l2"]) == 5
    # The embedding output (state 0) is the conv of the log-mel plus the position embedding:
    # once the stream has heard the clip's loudest sound (the first copy), its normalisation is
    # the offline one, so every step but the newest two (the STFT and convs reach past the
    # newest sample) must equal offline, up to float32 rounding: a window given the wrong
    # position cannot. (The last frames reach past the clip's end: offline pads zero steps.)
    inside = slice(n // 2, n - 3)
    steps, ref = (f.reshape(n, 10, 5, 384)[inside, :8, 0] for f in (live, offline))
    assert np.abs(steps - ref).max() < 1e-4
    # more past context brings the layers closer to offline than a 0.4 s window does
    short = streaming_deviation(whisper, audio, 25, batch=8, context_s=0.4)
    pairs = zip(report["per_state_relative_l2"], short["per_state_relative_l2"], strict=True)
    assert all(ours < cut for ours, cut in list(pairs)[1:])


def test_features_cli_writes_npy(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    args = ["features", str(JFK), "--models-dir", str(tiny), "--out", str(out), "--fps", "25"]
    result = CliRunner().invoke(app, [*args, "--streaming"])
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    assert feats.dtype == np.float32 and feats.shape == (275, 50, 384)
