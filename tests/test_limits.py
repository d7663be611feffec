"""Small inputs that asked for gigabytes: each is refused with one line, before allocating.
The resource cases run in a subprocess under an address-space limit (RLIMIT_AS), so a
regression fails the test instead of eating the machine."""

from __future__ import annotations

import json
import struct
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from livecam.cli import app
from livecam.limits import MAX_AUDIO_SECONDS
from tests.conftest import JFK, REPO
from tests.helpers import run_limited


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "0"], "outside 1 to 120 fps"),
        (["--fps", "nan"], "outside 1 to 120 fps"),
        (["--fps", "inf"], "outside 1 to 120 fps"),
        (["--fps", "1e-9"], "outside 1 to 120 fps"),
        (["--fps", "100000"], "outside 1 to 120 fps"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--size", "100000x100000"], "larger than 3840x2160"),
        (["--size", "0x0"], "at least 64"),
    ],
)
def test_flags_out_of_range_are_one_line(args, message):
    result = CliRunner().invoke(app, ["start", "--sink", "memory", "--no-dashboard", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--duration", "nan"], "must be above 0 and at most 604800, not nan"),
        (["start", "--duration", "-5"], "must be above 0 and at most 604800, not -5"),
        (["start", "--simulate-load", "inf"], "must be 0 to 100, not inf"),
        (["bench", "--soak", "1e300"], "must be above 0 and at most 604800"),
        (["bench", "--streams", "100000"], "less than or equal to 64"),
        (["bench", "--latency", "--bursts", "1000000000"], "less than or equal to 1000"),
        (["bench", "--latency", "--bursts", "-3"], "greater than or equal to 1"),
        (["render", "--audio", "a.wav", "--out", "o.mp4", "--fps", "1e-9"], "outside 1 to 120"),
        (["serve", "--port", "70000"], "--port"),
    ],
)
def test_other_numbers_out_of_range_are_one_line(args, message):
    """--bursts 1e9 allocated 140 TiB, --duration nan ran forever, --soak 1e300 likewise."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[start]\nduration = nan\n", "[start] duration = nan: must be above 0"),
        ("[bench]\nsoak = inf\n", "[bench] soak = inf: must be above 0"),
        ("[bench]\nbursts = 1000000000\n", "[bench] bursts = 1000000000"),
    ],
)
def test_config_file_numbers_out_of_range_name_the_file(tmp_path, monkeypatch, text, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("LIVECAM_CONFIG", str(config))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert message in output and str(config) in output and "Traceback" not in output


def test_features_larger_than_a_gib_are_refused_before_loading_a_model(tmp_path):
    """`livecam features` builds [T, 50, 384] float32 whole: 5 minutes at 120 fps is 2.6 GiB."""
    audio = tmp_path / "five_minutes.wav"
    sf.write(audio, np.zeros(8000 * 300, np.float32), 8000, subtype="PCM_16")
    missing = tmp_path / "no-models"  # refused before the models are looked for
    result = CliRunner().invoke(app, ["features", str(audio), "--out", str(tmp_path / "f.npy"),
                                      "--fps", "120", "--models-dir", str(missing)])  # fmt: skip
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "the features of 300 s at 120 fps would take 2.6 GiB" in output, output
    assert not (tmp_path / "f.npy").exists()


def _wav_header(rate: int, channels: int, frames: int) -> bytes:
    """A 16-bit PCM WAV header declaring `frames` frames (the data may be shorter)."""
    data = frames * channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", data))  # fmt: skip


def _audio_bombs(folder: Path) -> dict[str, str]:
    """file -> the message it must give."""
    noise = np.random.default_rng(0).normal(0, 0.1, 50_000)
    cases = {}
    for rate in (1, 100):  # 100 KB declared at 1 Hz: 6.4 GB once resampled
        path = folder / f"rate{rate}.wav"
        path.write_bytes(_wav_header(rate, 1, 50_000) + (noise * 3e4).astype("<i2").tobytes())
        cases[str(path)] = f"sampled at {rate} Hz"
    path = folder / "fast.wav"
    path.write_bytes(_wav_header(400_000, 1, 1000) + bytes(2000))
    cases[str(path)] = "sampled at 400000 Hz"
    path = folder / "one.wav"
    sf.write(path, np.zeros(1, np.float32), 16_000)
    cases[str(path)] = "too short (1 samples)"
    path = folder / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16_000)
    cases[str(path)] = "contains no samples"
    path = folder / "channels.wav"
    path.write_bytes(_wav_header(16_000, 200, 100) + bytes(200 * 100 * 2))
    cases[str(path)] = "200 channels"
    path = folder / "long.wav"  # 2 hours declared; a sparse file, so no disk is used
    frames = int(2 * MAX_AUDIO_SECONDS * 8000)
    with path.open("wb") as fh:
        fh.write(_wav_header(8000, 1, frames))
        fh.truncate(44 + frames * 2)
    cases[str(path)] = "120 minutes long"
    return cases


READ_ALL = textwrap.dedent("""
    import json, sys
    from livecam.audio.files import AudioFileError, read_audio
    out = {}
    for path in json.loads(sys.argv[1]):
        try:
            out[path] = f"read {len(read_audio(path))}"
        except AudioFileError as exc:
            out[path] = str(exc)
    print(json.dumps(out))
""")


def test_audio_bombs_are_refused_under_a_memory_limit(tmp_path):
    cases = _audio_bombs(tmp_path)
    result = run_limited([sys.executable, "-c", READ_ALL, json.dumps([*cases, str(JFK)])])
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout)
    for path, message in cases.items():
        assert message in answers[path] and path in answers[path], answers[path]
        assert "\n" not in answers[path]
    assert answers[str(JFK)] == "read 176000"  # a real file still reads under the limit


def test_render_of_an_audio_bomb_is_one_line(tmp_path):
    bomb = tmp_path / "bomb.wav"
    bomb.write_bytes(_wav_header(1, 1, 50_000) + bytes(100_000))
    result = run_limited([sys.executable, "-m", "livecam", "render", "--audio", str(bomb),
                          "--out", str(tmp_path / "o.mp4")])  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "sampled at 1 Hz" in result.stderr


def test_resampling_in_blocks_matches_the_whole_signal(tmp_path):
    from livecam.audio.files import read_audio, resample

    speech = np.tile(read_audio(JFK), 3)  # 33 s: four blocks
    at_44k = resample(speech, 16_000, 44_100)
    sf.write(tmp_path / "s.wav", np.stack([at_44k, at_44k], 1), 44_100, subtype="FLOAT")
    whole = resample(at_44k, 44_100, 16_000)
    blocks = read_audio(tmp_path / "s.wav")
    assert len(blocks) == len(whole)
    # block edges: below -55 dB of full scale (the inaudible tail of the band-limit filter)
    assert np.abs(blocks - whole).max() < 2e-3


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (its data is one empty row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * min(width, 1000)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("side", [30_000, 40_000])
def test_huge_image_is_refused_before_decoding(tmp_path, side):
    photo = tmp_path / "huge.png"
    _png_header_only(photo, side, side)
    result = run_limited([sys.executable, "-m", "livecam", "avatars", "prepare", "huge",
                          "--from", str(photo)])  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(photo) in result.stderr and "megapixels" in result.stderr


@pytest.mark.parametrize("name", ["portrait/portrait.jpg", "astronaut/astronaut.png"])
def test_a_cut_off_image_is_refused(tmp_path, name):
    from livecam.avatar.store import AvatarError, read_image

    source = REPO / "avatars" / name
    cut = tmp_path / source.name
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) * 4 // 10])
    with pytest.raises(AvatarError, match="damaged"):
        read_image(cut)
    assert read_image(source).size > 0
