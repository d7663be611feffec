"""MuseTalk's published model architecture, and the check of a config file against it.

A config read from the models folder is checked before any model is built: the dimensions
the pipeline depends on must equal the release's, every size must be at most the release's
(also those of keys the release leaves at their defaults, and the layer counts, which would
build millions of modules even on the meta device), so a damaged or hostile config.json can
neither crash the loader with a type error nor make it allocate more than the real models need.
"""

from __future__ import annotations

from typing import Any

# Published configs of the release models (also used to build random-weight models).
REFERENCE_UNET: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 4,
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "transformer_layers_per_block": 1,
}
REFERENCE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
REFERENCE_TAESD: dict[str, Any] = {  # diffusers' AutoencoderTiny defaults, as taesd ships
    "in_channels": 3,
    "out_channels": 3,
    "upsampling_scaling_factor": 2,
    "latent_channels": 4,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
}
REFERENCE_WHISPER: dict[str, Any] = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}
# whisper's preprocessor_config.json: the 30 s window of 3000 mel frames the pipeline is built on
REFERENCE_FEATURES: dict[str, Any] = {
    "feature_size": 80,
    "sampling_rate": 16_000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "n_samples": 480_000,
    "nb_max_frames": 3000,
}
# The same classes and interfaces at toy sizes: dry runs of the GPU suite on a CPU.
TINY_UNET = REFERENCE_UNET | {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_VAE = REFERENCE_VAE | {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
                            "norm_num_groups": 8}  # fmt: skip
TINY_TAESD = {"encoder_block_out_channels": [8] * 4, "decoder_block_out_channels": [8] * 4,
              "num_encoder_blocks": [1] * 4, "num_decoder_blocks": [1] * 4}  # fmt: skip
TINY_WHISPER = REFERENCE_WHISPER | {"encoder_ffn_dim": 64}
# Dimensions the rest of the pipeline is built around: they must be exactly the release's.
EXACT = {
    "unet": ("in_channels", "out_channels", "cross_attention_dim"),
    "vae": ("latent_channels", "in_channels", "out_channels"),
    "taesd": ("latent_channels", "in_channels", "out_channels", "upsampling_scaling_factor"),
    "whisper": ("d_model", "num_mel_bins"),
    "features": tuple(REFERENCE_FEATURES),
}
REFERENCE = {"unet": REFERENCE_UNET, "vae": REFERENCE_VAE, "taesd": REFERENCE_TAESD,
             "whisper": REFERENCE_WHISPER, "features": REFERENCE_FEATURES}  # fmt: skip
# Exact keys a config may leave out (the library default is the release's value).
OPTIONAL_EXACT = {"in_channels", "out_channels", "upsampling_scaling_factor", *REFERENCE_FEATURES}
# transformers' WhisperConfig aliases: setting one sets the key it names, after the check.
WHISPER_ALIASES = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers",
                   "num_attention_heads": "encoder_attention_heads",
                   "num_key_value_heads": "encoder_attention_heads"}  # fmt: skip
# diffusers keys the release leaves unset that would multiply the layers.
UNSET = {"unet": ("reverse_transformer_layers_per_block",)}


def config_problem(config: Any, model: str) -> str | None:
    """Why `config` (parsed JSON) cannot describe the release's `model`, or None."""
    if not isinstance(config, dict):
        return f"expected a JSON object, found {type(config).__name__}"
    for key, ref in REFERENCE[model].items():
        exact = key in EXACT[model]
        if key not in config:
            if exact and key not in OPTIONAL_EXACT:
                return f"{key} is missing (the release has {ref})"
            continue
        value = config[key]
        if isinstance(ref, list) and isinstance(ref[0], int):
            if not isinstance(value, list) or not 0 < len(value) <= len(ref):
                return f"{key} must be a list of at most {len(ref)} integers, not {value!r:.60}"
            if not all(_is_int(v) and 0 < v <= max(ref) for v in value):
                return f"{key} {value!r:.60} has entries outside 1..{max(ref)}"
        elif isinstance(ref, list):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return f"{key} must be a list of block names, not {value!r:.60}"
        elif isinstance(ref, int):
            if not _is_int(value):
                return f"{key} must be an integer, not {value!r:.60}"
            if exact and value != ref:
                return f"{key} is {value}; MuseTalk needs {ref}"
            if not 0 < value <= ref:
                return f"{key} {value} is outside 1..{ref} (the release's size)"
        elif not isinstance(value, int | float) or isinstance(value, bool):
            return f"{key} must be a number, not {value!r:.60}"
    return _other_keys_problem(config, model)


def _other_keys_problem(config: dict[str, Any], model: str) -> str | None:
    """Keys outside the reference: aliases must agree with what they alias; in the diffusers
    models any integer is bounded by the release's largest size."""
    if model == "whisper":  # its other keys describe the decoder, which is never built
        for alias, key in WHISPER_ALIASES.items():
            value = config.get(key, REFERENCE_WHISPER[key])
            if alias in config and config[alias] != value:
                return f"{alias} {config[alias]!r:.60} contradicts {key} {value!r:.60}"
        return None
    for key in UNSET.get(model, ()):
        if config.get(key) is not None:
            return f"{key} must be unset, not {config[key]!r:.60}"
    if model == "features":
        return None
    ceiling = max(_ints(list(REFERENCE[model].values())))
    for key, value in config.items():
        if key not in REFERENCE[model] and any(abs(v) > ceiling for v in _ints(value)):
            return f"{key} {value!r:.60} is larger than any size in the release ({ceiling})"
    return None


def _ints(value: Any) -> list[int]:
    """The integers in a JSON value's (nested) lists."""
    if isinstance(value, list):
        return [v for item in value for v in _ints(item)]
    return [value] if _is_int(value) else []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
