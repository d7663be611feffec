"""Tiny random-weight MuseTalk models written in the release file formats."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from livecam import models_cli
from livecam.engines.musetalk import download, manifest
from livecam.hashing import sha256_file

# musetalkV15/musetalk.json's keys (saved by diffusers 0.6.0.dev0), with tiny sizes
TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


def write_tiny_models(root: Path, taesd: bool = True) -> Path:
    """The models dir layout of MuseTalk's download script, tiny random weights."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    unet_dir = root / "musetalkV15"
    unet_dir.mkdir(parents=True)
    unet = UNet2DConditionModel.from_config(TINY_UNET)
    torch.save(unet.state_dict(), unet_dir / "unet.pth")
    (unet_dir / "musetalk.json").write_text(json.dumps(TINY_UNET))

    write_legacy_vae(tiny_vae(), root / "sd-vae")

    cfg = WhisperConfig(
        d_model=384, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        max_target_positions=16, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    whisper = WhisperForConditionalGeneration(cfg)
    wdir = root / "whisper"
    cfg.save_pretrained(wdir)
    torch.save(whisper.state_dict(), wdir / "pytorch_model.bin")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(wdir)

    if taesd:
        tiny = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
        tiny.save_pretrained(root / "taesd")
    return root


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
    )


LEGACY_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                    ".to_out.0.": ".proj_attn."}  # fmt: skip


def write_legacy_vae(vae, folder: Path) -> None:
    """A diffusers VAE folder as sd-vae-ft-mse ships it: a .bin pickle with the attention
    names of diffusers 0.4 (query/key/value/proj_attn)."""
    folder.mkdir(parents=True)
    state = {}
    for key, value in vae.state_dict().items():
        for new, old in LEGACY_ATTENTION.items():
            key = key.replace(new, old)
        state[key] = value
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    keys = (
        "act_fn",
        "block_out_channels",
        "down_block_types",
        "in_channels",
        "latent_channels",
        "layers_per_block",
        "norm_num_groups",
        "out_channels",
        "sample_size",
        "up_block_types",
    )
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2"}
    (folder / "config.json").write_text(json.dumps(config | {k: vae.config[k] for k in keys}))


def publish_tiny_hashes(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make the manifest's published hashes those of the tiny files under `root`."""

    def published(comp: manifest.Component, f: manifest.ModelFile) -> manifest.ModelFile:
        if not f.release_sha256:
            return f
        return replace(f, release_sha256=(sha256_file(comp.local_path(root, f)),))

    comps = tuple(replace(c, files=tuple(published(c, f) for f in c.files))
                  for c in manifest.COMPONENTS)  # fmt: skip
    for module in (manifest, download, models_cli):
        monkeypatch.setattr(module, "COMPONENTS", comps)


_WRITTEN: list[Path] = []


def tiny_models_dir() -> Path:
    """Written once per process, to a folder removed when the process ends, and shared by every
    musetalk test (tests that damage files copy it first). mutmut runs each mutant's tests in a
    fork of one process: written once, not once per mutant (2-3 s)."""
    if not _WRITTEN:
        folder = Path(tempfile.mkdtemp(prefix="livecam-tiny-models-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _WRITTEN.append(write_tiny_models(folder))
    return _WRITTEN[0]
