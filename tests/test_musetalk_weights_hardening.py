"""Damaged or hostile model files: refused with one line, before anything large is allocated,
never converted into the cache unless they fit, never a network attempt."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from livecam.engines.musetalk import weights
from tests.helpers import run_limited
from tests.musetalk_tiny import TINY_UNET, tiny_models_dir


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A private copy of the tiny models (tests damage it)."""
    return Path(shutil.copytree(tiny_models_dir(), tmp_path / "models"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cache_files() -> set[str]:
    """Converted weights and temporaries (not the sha256 memo, hashes.json)."""
    folder = weights.weights_cache_dir()
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return names - {"hashes.json"}


def _deflate(path: Path) -> None:
    """Rewrite a torch zip checkpoint with compressed entries (torch writes them stored)."""
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:
            dst.writestr(name, data)


def test_a_compressed_checkpoint_is_refused_unread(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"w": torch.zeros(4_000_000)}, path)  # 16 MB of zeros deflate to ~16 KB
    _deflate(path)
    assert path.stat().st_size < 200_000
    before = _cache_files()
    with pytest.raises(weights.WeightsError, match="is compressed, which torch never writes"):
        weights.load_state_dict(path, lambda _: None)
    assert _cache_files() == before


def test_weights_that_do_not_fit_are_never_converted(models):
    other = dict(TINY_UNET, block_out_channels=[16, 32])
    from diffusers import UNet2DConditionModel

    torch.save(UNet2DConditionModel.from_config(other).state_dict(),
               models / "musetalkV15" / "unet.pth")  # fmt: skip
    before = _cache_files()
    with pytest.raises(weights.WeightsError, match="weights do not fit the config"):
        weights.load_unet(models)
    assert _cache_files() == before  # no safetensors copy, no temporary left


def test_a_failed_conversion_leaves_nothing_behind(models, monkeypatch):
    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", disk_full)
    before = _cache_files()
    unet = weights.load_unet(models)  # still usable: the tensors are in memory
    assert unet.config.in_channels == 8
    assert _cache_files() == before


LOADERS = {
    "whisper/config.json": weights.load_whisper_encoder,
    "whisper/preprocessor_config.json": weights.load_feature_extractor,
    "musetalkV15/musetalk.json": weights.load_unet,
    "sd-vae/config.json": weights.load_vae,
    "taesd/config.json": weights.load_taesd,
}


@pytest.mark.parametrize(
    ("folder", "name", "content", "message"),
    [
        ("whisper", "config.json", {"d_model": 384, "num_mel_bins": 80, "encoder_ffn_dim": 10**9},
         "encoder_ffn_dim 1000000000 is outside 1..1536"),
        ("whisper", "config.json", {"d_model": 100_000, "num_mel_bins": 80},
         "d_model is 100000; MuseTalk needs 384"),
        ("musetalkV15", "musetalk.json", dict(TINY_UNET, in_channels="eight"),
         "in_channels must be an integer, not 'eight'"),
        ("musetalkV15", "musetalk.json", dict(TINY_UNET, block_out_channels=[10**6] * 2),
         "block_out_channels [1000000, 1000000] has entries outside 1..1280"),
        ("sd-vae", "config.json", [1, 2], "expected a JSON object, found list"),
        ("sd-vae", "config.json", "oops{", "is not valid JSON"),
        # keys outside the release's sizes: layer counts, aliases, the library's own checks
        ("musetalkV15", "musetalk.json", dict(TINY_UNET, transformer_layers_per_block=10**6),
         "transformer_layers_per_block 1000000 is outside 1..1"),
        ("musetalkV15", "musetalk.json", dict(TINY_UNET, num_class_embeds=10**9),
         "num_class_embeds 1000000000 is larger than any size in the release"),
        ("musetalkV15", "musetalk.json", dict(TINY_UNET, norm_num_groups=0),
         "does not describe the model (integer modulo by zero)"),
        ("whisper", "config.json", {"d_model": 384, "num_mel_bins": 80, "num_hidden_layers": 10**6},
         "num_hidden_layers 1000000 contradicts encoder_layers 4"),
        ("sd-vae", "config.json", {"latent_channels": 4, "out_channels": 512},
         "out_channels is 512; MuseTalk needs 3"),
        ("taesd", "config.json", {"latent_channels": 4, "upsampling_scaling_factor": 64},
         "upsampling_scaling_factor is 64; MuseTalk needs 2"),
        # the feature extractor's mel filter bank: 30 GB at n_fft 1e8
        ("whisper", "preprocessor_config.json", {"n_fft": 10**8}, "n_fft is 100000000"),
        ("whisper", "preprocessor_config.json", {"hop_length": 0}, "hop_length is 0"),
        ("whisper", "preprocessor_config.json", {"chunk_length": "30"},
         "chunk_length must be an integer"),
    ],
)  # fmt: skip
def test_a_bad_config_is_one_line(models, folder, name, content, message):
    path = models / folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    loader = LOADERS[f"{folder}/{name}"]
    with pytest.raises(weights.WeightsError) as err:
        loader(models)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (
            b"version https://git-lfs.github.com/spec/v1\n",
            "it begins with b'version https://git-lfs.",
        ),
        (b"hello\n", "it begins with b'hello\\n'"),  # was a KeyError traceback
        (b"", "the file is empty"),
    ],
)
def test_a_file_named_pth_that_is_no_checkpoint_is_named(models, content, shown):
    path = models / "musetalkV15" / "unet.pth"
    path.write_bytes(content)
    with pytest.raises(weights.WeightsError) as err:
        weights.load_unet(models)
    assert str(err.value).startswith(f"refused to load {path}: not a PyTorch checkpoint")
    assert shown in str(err.value) and "livecam models download" in str(err.value)


HUGE_TENSOR = b'{"w": {"dtype": "F32", "shape": [10000000000], "data_offsets": [0, 40000000000]}}'


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    "content",
    [
        (10**12).to_bytes(8, "little") + b"{}",  # a header longer than the file
        _safetensors(b"not json"),
        _safetensors(b"[1, 2]"),
        _safetensors(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', bytes(8)),
        _safetensors(HUGE_TENSOR),
        b"\x01",
    ],
)
def test_a_bad_safetensors_header_is_refused(models, content):
    path = models / "taesd" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(content)
    with pytest.raises(weights.WeightsError) as err:
        weights.load_taesd(models)
    assert f"refused to load {path}: not a valid safetensors file" in str(err.value)
    assert "\n" not in str(err.value)


VERIFY_HUGE_WHISPER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from livecam.engines.musetalk import weights
    config = Path(sys.argv[1]) / "whisper" / "config.json"
    data = json.loads(config.read_text())
    data.update(encoder_layers=64, encoder_ffn_dim=65536)  # ~7 GB of weights if built
    config.write_text(json.dumps(data))
    try:
        weights.load_whisper_encoder(Path(sys.argv[1]))
    except weights.WeightsError as exc:
        print(exc)
""")


def test_a_huge_whisper_config_allocates_nothing(models):
    result = run_limited([sys.executable, "-c", VERIFY_HUGE_WHISPER, str(models)])
    assert result.returncode == 0, result.stderr[-1500:]
    assert "is outside 1..4" in result.stdout or "is outside 1..1536" in result.stdout
