"""The config file: per-command defaults, flags win, mistakes are named."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from livecam.audio.files import read_audio
from livecam.cli import app
from tests.conftest import JFK
from tests.helpers import probe, write_clip


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("LIVECAM_CONFIG", str(path))
    return path


def _video(path: Path) -> tuple[int, int, str]:
    (video,) = [s for s in probe(path)["streams"] if s["codec_type"] == "video"]
    return video["width"], video["height"], video["r_frame_rate"]


def test_render_takes_its_defaults_from_the_file_and_flags_win(config, tmp_path):
    config.write_text('[render]\nsize = "320x240"\nfps = 10\n')
    clip = write_clip(tmp_path / "a.wav", read_audio(JFK)[:16_000])
    out = tmp_path / "a.mp4"
    runner = CliRunner()
    result = runner.invoke(app, ["render", "--audio", str(clip), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _video(out) == (320, 240, "10/1")
    args = ["render", "--audio", str(clip), "--out", str(out), "--size", "256x192"]
    assert runner.invoke(app, args).exit_code == 0
    assert _video(out) == (256, 192, "10/1")


def test_a_path_in_the_file_may_start_at_home(config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_clip(tmp_path / "a.wav", read_audio(JFK)[:16_000])
    config.write_text('[render]\naudio = "~/a.wav"\nout = "~/a.mp4"\nsize = "320x240"\n')
    result = CliRunner().invoke(app, ["render"])
    assert result.exit_code == 0, result.output
    assert _video(tmp_path / "a.mp4")[:2] == (320, 240)
    assert not (tmp_path / "~").exists() and not Path("~").exists()


def test_start_uses_the_configured_avatar(config):
    config.write_text('[start]\navatar = "nobody"\nvirtual-mic = false\n')
    args = ["start", "--audio", str(JFK), "--sink", "memory", "--no-dashboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "nobody" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[render]\nsise = "320x240"\n', "[render] has no option 'sise'"),
        ("[rendr]\n", "[rendr] is not a command table"),
        ("[render\n", "cannot read the config file"),
        ('[start]\nfps = "abc"\n', "[start] fps = 'abc'"),
        ("[start]\nfps = 0\n", "[start] fps = 0: frame rate 0.0 is outside 1 to 120 fps"),
        ("[render]\nsize = 5\n", "[render] size = 5: '5' is not WIDTHxHEIGHT"),
        ("[start]\nport = 70000\n", "[start] port = 70000"),
        ("[start]\nvirtual-mic = [1]\n", "[start] virtual-mic = [1]"),
        ("[start]\navatar = {a = 1}\n", "[start] avatar = {'a': 1}: expected one string"),
        ("[start]\ndevice = 1979-05-27\n", "[start] device = datetime.date(1979, 5, 27): exp"),
        ("[start.avatar]\nx = 1\n", "[start] avatar = {'x': 1}: expected one string"),
    ],
)
def test_config_mistakes_are_named(config, text, expected):
    config.write_text(text)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    assert expected in result.output and str(config) in result.output
    assert "Traceback" not in result.output
