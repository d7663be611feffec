"""Safe loading of the release weights and construction of the four models.

The release files are torch pickles. They are read with `torch.load(weights_only=True)`, which
refuses any pickle that would run code or build arbitrary objects; the resulting tensors are
written once to safetensors in the cache (keyed by the source file's sha256) and read from
there afterwards. Model configs come from the files next to the weights, never from code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from livecam.avatar.store import cache_root
from livecam.cachefile import replace_file
from livecam.engines.musetalk.architecture import REFERENCE_FEATURES, config_problem
from livecam.engines.musetalk.manifest import component
from livecam.hashing import sha256_file

log = logging.getLogger(__name__)

LOCAL_HEADER = 30  # bytes of a zip entry's local header before its name and extra field
PEEK = 24  # bytes of a file's start shown when it is not a checkpoint
# what the models compute in (bfloat16: a conversion the release might ship; no float8 kernels)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STALE_TEMPORARY_S = 3600.0  # a conversion's temporary this old was left by a killed process


class WeightsError(Exception):
    """A weight file that is missing, damaged or unsafe; the message says what to do."""


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (a library's can span a page)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def weights_cache_dir() -> Path:
    return cache_root() / "weights"


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoized by (path, size, mtime) so a 3.4 GB file is hashed once."""
    st = path.stat()
    memo_path = weights_cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):  # damaged: start again (a hash is only ever recomputed)
        memo = {}
    memo = {k: v for k, v in memo.items() if _is_sha256(v)}
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = sha256_file(path)
        data = json.dumps(memo).encode()
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(memo_path, lambda fh: fh.write(data))
        except OSError as exc:  # a full or read-only cache: hashed again next time
            log.warning("could not remember the hash of %s in %s: %s", path, memo_path, exc)
    return memo[key]


def safe_torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from a torch pickle, refusing anything else. A zip
    checkpoint (what torch.save writes) is memory-mapped: no tensor data is read until used,
    so its names, shapes and dtypes are checked before anything is allocated."""
    archive = _check_archive(path)
    if not archive:
        with path.open("rb") as fh:
            head = fh.read(PEEK)
        if not head.startswith(b"\x80"):  # torch's legacy format is a pickle: PROTO first
            raise WeightsError(
                f"refused to load {path}: not a PyTorch checkpoint "
                f"({f'it begins with {head!r}' if head else 'the file is empty'}); "
                "delete it and run `livecam models download`"
            )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    except Exception as exc:  # torch's unpickler raises many kinds for damaged input
        raise WeightsError(
            f"refused to load {path}: not a plain PyTorch tensor checkpoint ({_first_line(exc)}). "
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


def _check_archive(path: Path) -> bool:
    """Whether `path` is a zip checkpoint, after checking its entries: torch.save stores them
    uncompressed, so a compressed one (a small file that could expand to gigabytes) is
    refused, and so is one whose data would reach past the end of the file."""
    if not zipfile.is_zipfile(path):
        return False  # the legacy format: raw storages, no compression
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as fh:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise WeightsError(
                        f"refused to load {path}: {info.filename} is compressed, which torch "
                        "never writes (a small file could expand to gigabytes); delete it and "
                        "run `livecam models download`"
                    )
                fh.seek(info.header_offset)
                header = fh.read(LOCAL_HEADER)
                if len(header) < LOCAL_HEADER or header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"no local header for {info.filename}")
                name_len, extra_len = struct.unpack("<26xHH", header)  # the last 4 of 30 bytes
                end = info.header_offset + LOCAL_HEADER + name_len + extra_len + info.file_size
                if info.file_size != info.compress_size or end > size:
                    raise zipfile.BadZipFile(f"{info.filename} reaches past the end of the file")
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        raise WeightsError(
            f"refused to load {path}: damaged archive ({exc}); delete it and run "
            "`livecam models download`"
        ) from None
    return True


def load_state_dict(path: Path, use: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Hand the tensors of a weight file to `use` (which loads them into a model, raising
    WeightsError if they do not fit). A pickle is converted to a cached safetensors file, once,
    and only after `use` accepted it. A zip pickle is handed over memory-mapped, as the cached
    safetensors copy is later: `use` checks names, shapes and dtypes before anything is read."""
    if not path.is_file():
        raise WeightsError(f"missing {path}: run `livecam models download`")
    if path.suffix == ".safetensors":
        return use(_load_safetensors(path))
    cached = weights_cache_dir() / f"{cached_sha256(path)}.safetensors"
    if cached.is_file():
        try:
            return use(load_file(cached))
        except Exception as exc:  # a truncated or corrupt cache file: convert again
            log.warning("cached %s unusable (%s); converting again", cached, exc)
    state = safe_torch_load(path)
    use(state)  # WeightsError if they do not fit: nothing read or written
    _convert(state, cached)
    return None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise WeightsError(
            f"refused to load {path}: not a valid safetensors file ({_first_line(exc)}); "
            "delete it and run `livecam models download`"
        ) from None


def _convert(state: dict[str, torch.Tensor], cached: Path) -> None:
    """Write the safetensors copy through a temporary file; on failure nothing is left. What a
    conversion killed outright left behind (gigabytes) is removed by the next one."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(cached)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".tmp")
    except OSError as exc:  # an unwritable cache: the weights are still usable now
        log.warning("could not cache %s: %s", cached, exc)
        return
    os.close(fd)
    try:
        save_file(_unshared(state), tmp)
        os.replace(tmp, cached)
    except (OSError, RuntimeError) as exc:  # disk full, read-only cache: still usable now
        log.warning("could not cache %s: %s", cached, exc)
        return
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    log.info("converted weights to %s", cached)


def _remove_stale_temporaries(cached: Path) -> None:
    """Temporaries of `cached` older than any conversion takes (another process may be
    writing a fresh one)."""
    for tmp in cached.parent.glob(f".{cached.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights) or are not contiguous:
    copies of those only, the rest as they are (mapped from the file, read once as written)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (tensor.numel() and ptr in seen):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[name] = tensor
    return out


def read_json(path: Path, model: str) -> dict[str, Any]:
    """A `model`'s config file, checked against the release architecture before any use."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing {path}: run `livecam models download`") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc})") from None
    problem = config_problem(config, model)
    if problem:
        raise WeightsError(f"{path}: {problem}; run `livecam models download` to replace it")
    return config


def _folder(models_dir: Path, name: str) -> Path:
    return models_dir / component(name).folder


def _build(make: Callable[[], torch.nn.Module], config: Path) -> torch.nn.Module:
    """The model skeleton on the meta device: nothing allocated, no random init."""
    try:
        with torch.device("meta"):
            return make()
    except Exception as exc:  # the libraries' constructors raise any kind for a bad config
        raise WeightsError(
            f"{config} does not describe the model ({_first_line(exc)}); "
            "run `livecam models download` to replace it"
        ) from None


def _loader(model: torch.nn.Module, what: str, rename: Callable[[str], str | None] = str):
    """A `use` for load_state_dict: keys renamed (None: dropped), loaded strictly."""

    def use(state: dict[str, torch.Tensor]) -> None:
        renamed = {new: v for k, v in state.items() if (new := rename(k)) is not None}
        _load_into(model, renamed, what)

    return use


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in state.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise WeightsError(
                f"{what}: {name} is {tensor.dtype}; the release stores float32 or float16 weights"
            )
    try:  # strict: every parameter and buffer gets a tensor, so none is left on meta
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # "Error(s) in loading state_dict for X:", then a line each
        what_is_wrong = (line.strip().rstrip(".") for line in str(exc).splitlines()[1:])
        detail = _first_line(RuntimeError("; ".join(what_is_wrong)))
        raise WeightsError(f"{what}: weights do not fit the config ({detail})") from None


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


def _encoder_key(key: str) -> str | None:
    """whisper: only the encoder's weights (the decoder is never materialized)."""
    for prefix in ("model.encoder.", "encoder."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def load_unet(models_dir: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    folder = _folder(models_dir, "unet")
    config = read_json(folder / "musetalk.json", "unet")
    what = "musetalkV15/unet.pth"
    model = _build(lambda: UNet2DConditionModel.from_config(config), folder / "musetalk.json")
    load_state_dict(folder / "unet.pth", _loader(model, what))
    return model.eval().requires_grad_(False)


def load_vae(models_dir: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    folder = _folder(models_dir, "vae")
    config = read_json(folder / "config.json", "vae")
    what = "sd-vae/diffusion_pytorch_model.bin"
    model = _build(lambda: AutoencoderKL.from_config(config), folder / "config.json")
    load_state_dict(folder / "diffusion_pytorch_model.bin", _loader(model, what, _vae_key))
    return model.eval().requires_grad_(False)


def load_taesd(models_dir: Path) -> torch.nn.Module:
    from diffusers import AutoencoderTiny

    folder = _folder(models_dir, "taesd")
    config = read_json(folder / "config.json", "taesd")
    what = "taesd/diffusion_pytorch_model.safetensors"
    model = _build(lambda: AutoencoderTiny.from_config(config), folder / "config.json")
    load_state_dict(folder / "diffusion_pytorch_model.safetensors", _loader(model, what))
    return model.eval().requires_grad_(False)


def load_whisper_encoder(models_dir: Path) -> torch.nn.Module:
    """Only the encoder of whisper-tiny (the decoder weights are never materialized)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = _folder(models_dir, "whisper")
    config = read_json(folder / "config.json", "whisper")
    comp = component("whisper")
    f = next(f for f in comp.files if f.repo_path == "pytorch_model.bin")
    # the release pickle, else an imported model.safetensors (its accepted alternative)
    path = comp.present_path(models_dir, f) or comp.local_path(models_dir, f)
    what = f"whisper/{path.name} (encoder)"
    model = _build(lambda: WhisperEncoder(WhisperConfig.from_dict(config)), folder / "config.json")
    load_state_dict(path, _loader(model, what, _encoder_key))
    return model.eval().requires_grad_(False)


def load_feature_extractor(models_dir: Path) -> Any:
    """whisper's log-mel front end. Its config is checked against the release, which fixes
    every value the extractor uses, so it is built from those; nothing else in the file is."""
    from transformers import WhisperFeatureExtractor

    read_json(_folder(models_dir, "whisper") / "preprocessor_config.json", "features")
    return WhisperFeatureExtractor(**REFERENCE_FEATURES)
