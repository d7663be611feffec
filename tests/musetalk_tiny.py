"""Tiny random-weight MuseTalk models written in the release file formats."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET = {
    "in_channels": 8,
    "out_channels": 4,
    "sample_size": 32,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
}


def write_tiny_models(root: Path, taesd: bool = True) -> Path:
    """The models dir layout of MuseTalk's download script, tiny random weights."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    unet_dir = root / "musetalkV15"
    unet_dir.mkdir(parents=True)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.save(unet.state_dict(), unet_dir / "unet.pth")
    (unet_dir / "musetalk.json").write_text(json.dumps(TINY_UNET))

    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
    )
    vae.save_pretrained(root / "sd-vae", safe_serialization=False)

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


_WRITTEN: dict[str, Path] = {}


def tiny_models_dir(factory) -> Path:
    """Written once per test session (shared by every musetalk test module)."""
    if "root" not in _WRITTEN:
        _WRITTEN["root"] = write_tiny_models(factory.mktemp("musetalk-models"))
    return _WRITTEN["root"]
