"""Safe loading of the release weights and construction of the four models.

The release files are torch pickles. They are read with `torch.load(weights_only=True)`, which
refuses any pickle that would run code or build arbitrary objects; the resulting tensors are
written once to safetensors in the cache (keyed by the source file's sha256) and read from
there afterwards. Model configs come from the files next to the weights, never from code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from livecam.avatar.store import cache_root
from livecam.hashing import sha256_file
from livecam.musetalk.manifest import component

log = logging.getLogger(__name__)


class WeightsError(Exception):
    """A weight file that is missing, damaged or unsafe; the message says what to do."""


def weights_cache_dir() -> Path:
    return cache_root() / "weights"


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoized by (path, size, mtime) so a 3.4 GB file is hashed once."""
    st = path.stat()
    memo_path = weights_cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = sha256_file(path)
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(memo_path, json.dumps(memo, indent=1).encode())
    return memo[key]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def safe_torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from a torch pickle, refusing anything else."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"refused to load {path}: it is not a plain tensor checkpoint ({first}). "
            "It may be damaged or tampered with; delete it and run `livecam models download`"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"refused {path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"refused {path}: non-tensor entries such as {bad[0]!r}")
    return obj


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file; pickles are converted once to a cached safetensors file."""
    if not path.is_file():
        raise WeightsError(f"missing {path}: run `livecam models download`")
    if path.suffix == ".safetensors":
        return load_file(path)
    cached = weights_cache_dir() / f"{cached_sha256(path)}.safetensors"
    if cached.is_file():
        try:
            return load_file(cached)
        except Exception as exc:  # a truncated or corrupt cache file: convert again
            log.warning("cached %s unreadable (%s); converting again", cached, exc)
    state = safe_torch_load(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    # safetensors refuses shared or non-contiguous storage: give each tensor its own
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, cached)
    log.info("converted %s to %s", path, cached)
    return state


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing {path}: run `livecam models download`") from None
    except ValueError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc})") from None


def _folder(models_dir: Path, name: str) -> Path:
    return models_dir / component(name).folder


def _build(cls: Any, config: dict[str, Any]) -> torch.nn.Module:
    """The model skeleton on the meta device: no time spent on a random init."""
    with torch.device("meta"):
        return cls.from_config(config)


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        head = str(exc).splitlines()[0]
        raise WeightsError(f"{what}: weights do not fit the config ({head})") from None
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise WeightsError(f"{what}: no weights for {meta[0]}")


def _vae_key(key: str) -> str:
    """Old diffusers attention names (as in the sd-vae-ft-mse .bin) -> current ones."""
    for old, new in (
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ):
        key = key.replace(old, new)
    return key


def load_unet(models_dir: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    folder = _folder(models_dir, "unet")
    config = read_json(folder / "musetalk.json")
    model = _build(UNet2DConditionModel, config)
    _load_into(model, load_state_dict(folder / "unet.pth"), "musetalkV15/unet.pth")
    return model.eval().requires_grad_(False)


def load_vae(models_dir: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    folder = _folder(models_dir, "vae")
    model = _build(AutoencoderKL, read_json(folder / "config.json"))
    state = {
        _vae_key(k): v for k, v in load_state_dict(folder / "diffusion_pytorch_model.bin").items()
    }
    _load_into(model, state, "sd-vae/diffusion_pytorch_model.bin")
    return model.eval().requires_grad_(False)


def load_taesd(models_dir: Path) -> torch.nn.Module:
    from diffusers import AutoencoderTiny

    folder = _folder(models_dir, "taesd")
    model = _build(AutoencoderTiny, read_json(folder / "config.json"))
    state = load_state_dict(folder / "diffusion_pytorch_model.safetensors")
    _load_into(model, state, "taesd/diffusion_pytorch_model.safetensors")
    return model.eval().requires_grad_(False)


def load_whisper_encoder(models_dir: Path) -> torch.nn.Module:
    """Only the encoder of whisper-tiny (the decoder weights are never materialized)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = _folder(models_dir, "whisper")
    config = WhisperConfig.from_dict(read_json(folder / "config.json"))
    comp = component("whisper")
    f = next(f for f in comp.files if f.repo_path == "pytorch_model.bin")
    # the release pickle, else an imported model.safetensors (its accepted alternative)
    path = comp.present_path(models_dir, f) or comp.local_path(models_dir, f)
    state = load_state_dict(path)
    enc = {}
    for key, value in state.items():
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                enc[key[len(prefix) :]] = value
    model = WhisperEncoder(config)
    _load_into(model, enc, f"whisper/{path.name} (encoder)")
    return model.eval().requires_grad_(False)


def load_feature_extractor(models_dir: Path) -> Any:
    from transformers import WhisperFeatureExtractor

    folder = _folder(models_dir, "whisper")
    cfg = read_json(folder / "preprocessor_config.json")
    cfg.pop("feature_extractor_type", None)
    cfg.pop("processor_class", None)
    return WhisperFeatureExtractor(**cfg)
