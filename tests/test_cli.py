"""The CLI commands that list, show and measure: devices, avatars list/show/remove, bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import sounddevice
from typer.testing import CliRunner

from livecam import terminal
from livecam.audio.files import read_audio
from livecam.avatar.preview import OPENNESS, TILE, WIDTHS
from livecam.cli import app
from livecam.constants import SAMPLE_RATE
from tests.conftest import JFK, REPO
from tests.helpers import write_clip

runner = CliRunner()


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_devices_lists_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [
        {"name": "Speakers", "max_input_channels": 0, "default_samplerate": 48000.0},
        {"name": "USB Headset Mic", "max_input_channels": 1, "default_samplerate": 44100.0},
        {"name": "Studio Interface", "max_input_channels": 2, "default_samplerate": 96000.0},
    ]
    monkeypatch.setattr(sounddevice, "query_devices", lambda *a, **kw: found)
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "Hz" in line]
    assert len(rows) == 2 and "Speakers" not in result.output
    assert "USB Headset Mic" in rows[0] and "44100 Hz" in rows[0] and " 1 " in rows[0]
    assert "Studio Interface" in rows[1] and "96000 Hz" in rows[1] and " 2 " in rows[1]


def _row(output: str, name: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(f"\u2502 {name} ")]
    return line


def test_avatars_list_show_remove(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal.console, "width", 200)  # one table row per line
    photo = tmp_path / "me.png"
    image = cv2.imread(str(REPO / "avatars" / "portrait" / "portrait.jpg"))
    cv2.imwrite(str(photo), cv2.resize(image[40:400, 150:480], (165, 180)))
    assert runner.invoke(app, ["avatars", "prepare", "me", "--from", str(photo)]).exit_code == 0

    listed = runner.invoke(app, ["avatars", "list"])
    assert listed.exit_code == 0, listed.output
    assert "prepared" in _row(listed.output, "me") and "ready" in _row(listed.output, "me")
    assert "bundled" in _row(listed.output, "astronaut")
    assert "not prepared" in _row(listed.output, "portrait")

    sheet = tmp_path / "me-sheet.png"
    shown = runner.invoke(app, ["avatars", "show", "me", "--out", str(sheet)])
    assert shown.exit_code == 0, shown.output
    png = cv2.imread(str(sheet))
    assert png.shape == ((len(WIDTHS) + 1) * TILE, len(OPENNESS) * TILE, 3)
    tiles = png.reshape(len(WIDTHS) + 1, TILE, len(OPENNESS), TILE, 3).swapaxes(1, 2)
    closed, wide_open = tiles[1, 0].astype(int), tiles[1, -1].astype(int)
    assert np.abs(closed - wide_open).mean() > 1.0  # the mouth shapes differ
    assert np.abs(tiles[3, 0].astype(int) - tiles[3, -1]).mean() > 0.5  # and so does the blink

    removed = runner.invoke(app, ["avatars", "remove", "me"])
    assert removed.exit_code == 0, removed.output
    assert not (cache / "avatars" / "me").exists()
    assert "\u2502 me " not in runner.invoke(app, ["avatars", "list"]).output
    again = runner.invoke(app, ["avatars", "remove", "me"])
    assert again.exit_code == 1 and "has no cache" in again.output


def test_bench_lite_reports_its_render(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "one.wav", read_audio(JFK)[:SAMPLE_RATE])
    args = ["bench", "--engine", "lite", "--audio", str(clip), "--size", "160x120", "--json"]
    result = runner.invoke(app, [*args, "--fps", "25"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["engine"] == "lite" and report["size"] == "160x120"
    assert report["audio_seconds"] == 1.0 and report["frames"] == math.ceil(1.0 * 25)
    p = report["frame_ms"]
    assert 0 < p["p50"] <= p["p95"] <= p["p99"]
    factor = report["render_seconds"] / report["audio_seconds"]
    assert report["render_realtime_factor"] == pytest.approx(factor, abs=1e-3)


def test_bench_soak_reports_the_run(tmp_path: Path) -> None:
    args = ["bench", "--soak", "2", "--size", "160x120", "--fps", "25", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    soak = json.loads(result.output)["soak"]
    assert soak["seconds"] >= 2.0 and soak["target_fps"] == 25
    (minute,) = soak["per_minute"]  # one partial minute
    shown = soak["shown_fps"] * soak["seconds"]
    assert minute["frames"] > 0 and abs(minute["frames"] - shown) <= 0.05 * shown + 3
    assert 0.0 <= soak["skip_ratio"] <= 1.0 and soak["playout_delay_ms"] > 0
    assert soak["mode"]["tier"] in ("full", "nearest")
    assert soak["latency_p95_growth_percent"] is None  # needs two whole minutes
    assert minute["latency_p50_ms"] <= minute["latency_p95_ms"]


def _marks(output: str) -> dict[str, str]:
    """{check name: its line} from doctor's output."""
    out = {}
    for line in output.splitlines():
        head, sep, _ = line.partition(":")
        if sep and head.split():
            out[" ".join(head.split()[1:])] = line
    return out


def _healthy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor's machine checks all pass (or are optional), whatever this machine has."""
    from livecam.audio import pulse, sources
    from livecam.sinks import virtualcam

    monkeypatch.setattr(terminal.console, "width", 300)
    monkeypatch.setattr(virtualcam, "loopback_devices", lambda: [])
    monkeypatch.setattr(sources, "input_devices", lambda: [{"name": "Mic A"}])
    monkeypatch.setattr(pulse, "available", lambda: False)


def test_doctor_checks_the_remote_pool_that_start_is_configured_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Nothing listens at the configured pool: a required check fails and says what to look
    at; without a token file it says that; with no pool configured there is no such check.
    (A pool that answers: tests/test_remote_serve.py.)"""
    import socket

    _healthy_machine(monkeypatch)
    monkeypatch.setenv("LIVECAM_CONFIG", str(tmp_path / "config.toml"))
    assert runner.invoke(app, ["doctor"]).exit_code == 0
    assert "remote pool" not in _marks(runner.invoke(app, ["doctor"]).output)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}"
    token = tmp_path / "token"
    token.write_text("t" * 32)
    (tmp_path / "config.toml").write_text(f'[start]\nremote = "{url}"\ntoken-file = "{token}"\n')
    result = runner.invoke(app, ["doctor"])
    line = _marks(result.output)["remote pool"]
    assert result.exit_code == 1, result.output
    assert "FAIL" in line and f"cannot reach the livecam server at {url}" in line, line
    assert "is `livecam serve` running there" in line
    (tmp_path / "config.toml").write_text(f'[start]\nremote = "{url}"\n')
    line = _marks(runner.invoke(app, ["doctor"]).output)["remote pool"]
    assert "FAIL" in line and "--token-file FILE is needed" in line, line


def test_doctor_marks_each_check_and_fails_only_on_required_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from livecam import doctor
    from livecam.audio import sources

    _healthy_machine(monkeypatch)
    real_which = doctor.shutil.which
    monkeypatch.setattr(doctor.shutil, "which", lambda n: None if n == "ffmpeg" else real_which(n))
    result = runner.invoke(app, ["doctor"])
    marks = _marks(result.output)
    assert result.exit_code == 1, result.output  # ffmpeg is required
    assert "FAIL" in marks["ffmpeg"] and "sudo apt-get install ffmpeg" in marks["ffmpeg"]
    assert "--" in marks["virtual camera"] and "modprobe v4l2loopback" in marks["virtual camera"]
    assert "--" in marks["PulseAudio/PipeWire"]  # optional: only --virtual-mic needs it
    assert "ok" in marks["microphone"] and "1 input(s), e.g. 'Mic A'" in marks["microphone"]
    assert "ok" in marks["avatars"] and "astronaut" in marks["avatars"]

    monkeypatch.setattr(doctor.shutil, "which", real_which)
    monkeypatch.setattr(sources, "input_devices", lambda: [])
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1 and "FAIL" in _marks(result.output)["microphone"]
    monkeypatch.setattr(sources, "input_devices", lambda: [{"name": "Mic A"}])
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output  # only optional checks are left failing
    assert "ok" in _marks(result.output)["ffmpeg"]

    find_spec = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec",
                        lambda name: None if name == "torch" else find_spec(name))  # fmt: skip
    result = runner.invoke(app, ["doctor"])
    torch = _marks(result.output)["torch"]  # printed as is: "[musetalk]" is no markup tag
    assert "--" in torch and "pip install 'livecam[musetalk]' (musetalk only)" in torch


def test_devices_lists_names_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    from livecam.audio import sources

    monkeypatch.setattr(terminal.console, "width", 200)
    device = {"index": 3, "name": "Mic [hw:1] [/dev/snd]", "channels": 1,
              "default_samplerate": 48000.0}  # fmt: skip
    monkeypatch.setattr(sources, "input_devices", lambda: [device])
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 0, result.output
    assert "Mic [hw:1] [/dev/snd]" in result.output and "48000 Hz" in result.output
