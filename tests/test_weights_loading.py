"""Reading weight files: both checkpoint formats, what each refusal says word for word (users act
on it), the safetensors copy (written beside its target, never a tensor copied that need not be),
and the four loaders (their names in messages, frozen models)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import time
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import torch.serialization
from safetensors.torch import load_file, save_file

from livecam.engines.musetalk import weights
from tests.helpers import TouchingPickle
from tests.musetalk_tiny import tiny_models_dir

DOWNLOAD = "delete it and run `livecam models download`"
TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1, dtype=torch.float16)}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own weights cache: the same tensors saved twice have the same sha256."""
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))


def _save(obj: object, path: Path, zipped: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file the tensor's memory is mapped from (/proc/self/maps), or None."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= ptr < high:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.parametrize("zipped", [True, False])
def test_both_checkpoint_formats_load_and_a_zip_is_mapped_not_read(tmp_path, zipped):
    path = _save(TENSORS, tmp_path / "w.pth", zipped)
    state = weights.safe_torch_load(path)
    assert state.keys() == TENSORS.keys()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in TENSORS.items())
    # a zip checkpoint's tensors stay in the file until used (a 3.4 GB UNet is not read twice)
    assert (_mapped_file(state["a"]) == str(path)) is zipped


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_machine_without_one(tmp_path):
    """The storages of a checkpoint saved from CUDA tensors say "cuda:0": they are put on the
    host, not refused for want of a GPU."""

    def on_gpu(storage: object) -> str | None:
        return "cuda:0" if getattr(storage, "device", None) == torch.device("cpu") else None

    torch.serialization.register_package(1, on_gpu, lambda *_: None)
    try:
        path = _save(TENSORS, tmp_path / "unet.pth")
    finally:
        registry = torch.serialization._package_registry
        registry[:] = [entry for entry in registry if entry[1] is not on_gpu]
    assert b"cuda:0" in zipfile.ZipFile(path).read(zipfile.ZipFile(path).namelist()[0])
    state = weights.safe_torch_load(path)
    assert state["a"].device == torch.device("cpu") and torch.equal(state["a"], TENSORS["a"])


@pytest.mark.parametrize("zipped", [True, False])
def test_a_tampered_pickle_is_refused_even_where_torchs_default_is_flipped(
    tmp_path, monkeypatch, zipped
):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's weights_only default off: livecam
    never relies on the default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "unet.pth"
    if zipped:
        _save({"w": torch.zeros(2), "x": TouchingPickle(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": TouchingPickle(marker)}, protocol=2))
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert not marker.exists(), "the pickle payload ran"
    message = str(err.value)
    start = f"refused to load {path}: not a plain PyTorch tensor checkpoint ("
    end = f"). It may be damaged or tampered with; {DOWNLOAD}"
    assert message.startswith(start) and message.endswith(end), message
    assert message[len(start) : -len(end)].startswith("Weights only load failed")  # torch's


def test_a_training_checkpoint_gives_its_state_dict(tmp_path):
    path = _save({"state_dict": TENSORS, "epoch": torch.tensor(3)}, tmp_path / "w.pth")
    state = weights.safe_torch_load(path)
    assert state.keys() == TENSORS.keys() and torch.equal(state["a"], TENSORS["a"])


HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>\n"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (HTML, f"it begins with {HTML[:24]!r}"),  # a web page saved under the file's name
        (b"\x00\x01", "it begins with b'\\x00\\x01'"),
        (b"", "the file is empty"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_how_it_begins(tmp_path, content, why):
    path = tmp_path / "unet.pth"
    path.write_bytes(content)
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == f"refused to load {path}: not a PyTorch checkpoint ({why}); {DOWNLOAD}"


@pytest.mark.parametrize(("obj", "kind"), [([torch.zeros(2)], "list"), ({}, "dict")])
def test_a_checkpoint_that_is_no_dict_of_tensors_is_named(tmp_path, obj, kind):
    path = _save(obj, tmp_path / "w.pth")
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == f"refused {path}: expected a dict of tensors, got {kind}"


def _damaged(path: Path, why: str) -> str:
    return f"refused to load {path}: damaged archive ({why}); {DOWNLOAD}"


def _entries(path: Path) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as archive:
        return archive.infolist()


def test_a_compressed_entry_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "w.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w/data.pkl", bytes(1000))
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == (
        f"refused to load {path}: w/data.pkl is compressed, which torch never writes (a small "
        f"file could expand to gigabytes); delete it and run `livecam models download`"
    )


def test_an_entry_without_its_local_header_is_refused(tmp_path):
    path = _save(TENSORS, tmp_path / "w.pth")
    entry = _entries(path)[1]
    with path.open("r+b") as fh:
        fh.seek(entry.header_offset)
        fh.write(b"PK\x00\x00")  # the central directory still lists the entry
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == _damaged(path, f"no local header for {entry.filename}")


def _claim_size(path: Path, index: int, past_the_end: int) -> str:
    """Make the central directory claim that entry `index` holds data reaching `past_the_end`
    bytes beyond the end of the file (counted from its local header, as a reader does)."""
    data = bytearray(path.read_bytes())
    entry = _entries(path)[index]
    local = entry.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    claimed = len(data) + past_the_end - (local + 30 + name_len + extra_len)
    with zipfile.ZipFile(path) as archive:
        record = archive.start_dir
    for _ in range(index):  # central directory records: 46 bytes, then name, extra, comment
        record += 46 + sum(struct.unpack("<HHH", data[record + 28 : record + 34]))
    assert data[record : record + 4] == b"PK\x01\x02"
    data[record + 20 : record + 28] = struct.pack("<II", claimed, claimed)
    path.write_bytes(data)
    return entry.filename


def _tensor_entry(path: Path) -> int:
    """The index of an entry with an extra field (torch pads tensor data to 64 bytes)."""
    for index, entry in enumerate(_entries(path)):
        with path.open("rb") as fh:
            fh.seek(entry.header_offset + 28)
            if struct.unpack("<H", fh.read(2))[0]:
                return index
    raise AssertionError("torch wrote no padded entry")


def test_an_entry_reaching_one_byte_past_the_end_is_refused(tmp_path):
    path = _save(TENSORS, tmp_path / "w.pth")
    name = _claim_size(path, _tensor_entry(path), past_the_end=1)
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == _damaged(path, f"{name} reaches past the end of the file")


def test_a_long_extra_field_is_counted_whole(tmp_path):
    """Header lengths are unsigned: a 40000-byte extra field is not a negative one."""
    path = tmp_path / "w.pth"
    info = zipfile.ZipInfo("w/data/0")
    info.extra = struct.pack("<HH", 0xCAFE, 39996) + bytes(39996)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, bytes(64))
    _claim_size(path, 0, past_the_end=1)
    with pytest.raises(weights.WeightsError) as err:
        weights.safe_torch_load(path)
    assert str(err.value) == _damaged(path, "w/data/0 reaches past the end of the file")


def test_a_bad_safetensors_file_quotes_the_librarys_reason(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(Exception) as library:  # whatever safetensors raises
        load_file(path)
    reason = str(library.value).strip().splitlines()[0]
    with pytest.raises(weights.WeightsError) as err:
        weights.load_state_dict(path, lambda _: None)
    assert str(err.value) == (
        f"refused to load {path}: not a valid safetensors file ({reason}); {DOWNLOAD}"
    )


def test_only_tied_or_strided_tensors_are_copied_for_safetensors():
    tied = torch.arange(12.0).reshape(3, 4)
    alone = torch.arange(6.0).reshape(2, 3)
    strided = torch.arange(6.0).reshape(2, 3).t()  # its own storage, not contiguous
    state = {"tied": tied, "again": tied, "alone": alone, "strided": strided,
             "empty": torch.zeros(0), "empty2": torch.zeros(0)}  # fmt: skip
    out = weights._unshared(state)
    assert [k for k in state if out[k] is not state[k]] == ["again", "strided"]
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert out["strided"].is_contiguous()
    assert out["again"].untyped_storage().data_ptr() != tied.untyped_storage().data_ptr()


def _cached(path: Path) -> Path:
    return weights.weights_cache_dir() / f"{weights.sha256_file(path)}.safetensors"


def test_the_copy_is_written_beside_the_cache_then_renamed(tmp_path, monkeypatch, caplog):
    path = _save(TENSORS, tmp_path / "w.pth")
    cached = _cached(path)
    written: list[Path] = []

    def save(tensors: dict, filename: str) -> None:
        written.append(Path(filename))
        save_file(tensors, filename)

    monkeypatch.setattr(weights, "save_file", save)
    caplog.set_level(logging.INFO, logger=weights.log.name)
    weights.load_state_dict(path, lambda _: None)
    # the same folder (a rename, never a copy across file systems), under a name that the next
    # conversion recognizes as its own if this one is killed
    [tmp] = written
    assert tmp.parent == cached.parent and fnmatch(tmp.name, f".{cached.name}.*.tmp")
    assert not tmp.exists() and set(load_file(cached)) == set(TENSORS)
    assert [r.getMessage() for r in caplog.records] == [f"converted weights to {cached}"]


def test_a_killed_conversions_leftovers_are_removed_by_the_next(tmp_path):
    path = _save(TENSORS, tmp_path / "w.pth")
    cached = _cached(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    stale = cached.parent / f".{cached.name}.k1ll3d.tmp"
    busy = cached.parent / f".{cached.name}.wr1t1ng.tmp"  # another process, converting now
    other = cached.parent / ".0123.safetensors.k1ll3d.tmp"  # another file's, left for its own
    for leftover in (stale, busy, other):
        leftover.write_bytes(b"part of a conversion")
    hours_ago = time.time() - 2 * weights.STALE_TEMPORARY_S
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    weights.load_state_dict(path, lambda _: None)
    assert cached.is_file() and not stale.exists()
    assert busy.exists() and other.exists()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_full_disk_leaves_the_weights_usable_and_says_why(tmp_path, monkeypatch, caplog):
    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", disk_full)
    path = _save(TENSORS, tmp_path / "w.pth")
    used: list[dict] = []
    weights.load_state_dict(path, used.append)
    assert torch.equal(used[0]["a"], TENSORS["a"])
    cached = _cached(path)
    assert _warnings(caplog) == [f"could not cache {cached}: [Errno 28] No space left on device"]
    assert not cached.parent.exists() or not any(cached.parent.glob("*.tmp"))


def test_a_cache_that_cannot_be_created_leaves_the_weights_usable(tmp_path, monkeypatch, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "weights").write_text("a file where the folder should be")
    path = _save(TENSORS, tmp_path / "w.pth")
    used: list[dict] = []
    weights.load_state_dict(path, used.append)
    assert torch.equal(used[0]["a"], TENSORS["a"])
    cached = _cached(path)
    [warning] = [w for w in _warnings(caplog) if w.startswith("could not cache")]
    assert warning.startswith(f"could not cache {cached}: [Errno 17] File exists")


@pytest.mark.parametrize(
    ("key", "encoder_key"),
    [("model.encoder.conv1.weight", "conv1.weight"),  # transformers' WhisperModel
     ("encoder.layers.0.fc1.bias", "layers.0.fc1.bias"),  # openai-whisper's own layout
     ("model.decoder.embed_tokens.weight", None), ("decoder.encoder.x", None)],
)  # fmt: skip
def test_only_the_whisper_encoder_is_kept(key, encoder_key):
    assert weights._encoder_key(key) == encoder_key


LOADERS = {  # loader: (weight file, what messages call it, its config)
    weights.load_unet: ("musetalkV15/unet.pth", "musetalkV15/unet.pth", "musetalk.json"),
    weights.load_vae: ("sd-vae/diffusion_pytorch_model.bin",) * 2 + ("config.json",),
    weights.load_taesd: ("taesd/diffusion_pytorch_model.safetensors",) * 2 + ("config.json",),
    weights.load_whisper_encoder: ("whisper/pytorch_model.bin",
                                   "whisper/pytorch_model.bin (encoder)", "config.json"),
}  # fmt: skip


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_models_dir(), tmp_path / "models"))


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_a_loaded_model_is_frozen_for_inference(models, loader):
    model = loader(models)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_weights_that_do_not_fit_are_named_as_the_release_names_them(models, loader):
    file, what, _ = LOADERS[loader]
    path = models / file
    if path.suffix == ".safetensors":
        save_file({"model.encoder.stray": torch.zeros(1)}, path)
    else:
        _save({"model.encoder.stray": torch.zeros(1)}, path)
    with pytest.raises(weights.WeightsError) as err:
        loader(models)
    assert str(err.value).startswith(f"{what}: weights do not fit the config (")


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_a_config_the_library_cannot_build_is_named(models, loader):
    file, _, config_name = LOADERS[loader]
    config = models / Path(file).parent / config_name
    data = json.loads(config.read_text())
    key = "activation_function" if loader is weights.load_whisper_encoder else "act_fn"
    config.write_text(json.dumps(data | {key: "no such function"}))
    with pytest.raises(weights.WeightsError) as err:
        loader(models)
    assert str(err.value).startswith(f"{config} does not describe the model (")
    assert str(err.value).endswith("; run `livecam models download` to replace it")


def _linear() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Linear(2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_in_a_dtype_the_models_compute_in_are_taken(dtype):
    model = _linear()
    weights._load_into(
        model, {"weight": torch.ones(2, 2, dtype=dtype), "bias": torch.zeros(2)}, "w"
    )
    assert model.weight.dtype == dtype and not model.weight.is_meta


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.int8, torch.bool])
def test_weights_in_another_dtype_are_refused(dtype):
    state = {"bias": torch.zeros(2), "weight": torch.ones(2, 2).to(dtype)}
    with pytest.raises(weights.WeightsError) as err:
        weights._load_into(_linear(), state, "w")
    assert str(err.value) == f"w: weight is {dtype}; the release stores float32 or float16 weights"


@pytest.mark.parametrize(
    ("state", "detail"),
    [({"weight": torch.ones(2, 2), "bias": torch.zeros(2), "stray": torch.zeros(1)},
      'Unexpected key(s) in state_dict: "stray"'),
     ({"weight": torch.ones(2, 2)}, 'Missing key(s) in state_dict: "bias"'),
     ({"weight": torch.ones(2, 2), "stray": torch.zeros(1)},
      'Missing key(s) in state_dict: "bias"; Unexpected key(s) in state_dict: "stray"'),
     ({"weight": torch.ones(3, 2), "bias": torch.zeros(2)},
      "size mismatch for weight: copying a param with shape torch.Size([3, 2]) from checkpoint, "
      "the shape in current model is torch.Size([2, 2])")],
)  # fmt: skip
def test_weights_that_do_not_fit_say_which(state, detail):
    """torch's first line names only the model; what does not fit is on the lines after it."""
    with pytest.raises(weights.WeightsError) as err:
        weights._load_into(_linear(), state, "w")
    assert str(err.value) == f"w: weights do not fit the config ({detail})"


def test_what_does_not_fit_is_cut_to_one_short_line():
    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(30)))
    with pytest.raises(weights.WeightsError) as err:
        weights._load_into(model, {}, "w")
    start = 'w: weights do not fit the config (Missing key(s) in state_dict: "0.weight", "0.bias"'
    assert str(err.value).startswith(start)
    assert len(str(err.value)) == len("w: weights do not fit the config ()") + 200


def test_a_missing_file_says_what_to_run(tmp_path, models):
    missing = tmp_path / "unet.pth"
    with pytest.raises(weights.WeightsError) as err:
        weights.load_state_dict(missing, lambda _: None)
    assert str(err.value) == f"missing {missing}: run `livecam models download`"
    config = models / "sd-vae" / "config.json"
    config.unlink()
    with pytest.raises(weights.WeightsError) as err:
        weights.load_vae(models)
    assert str(err.value) == f"missing {config}: run `livecam models download`"
    encoder = models / "whisper" / "pytorch_model.bin"
    encoder.unlink()
    with pytest.raises(weights.WeightsError) as err:
        weights.load_whisper_encoder(models)
    assert str(err.value) == f"missing {encoder}: run `livecam models download`"


def test_an_unusable_cached_copy_is_converted_again_and_said(tmp_path, caplog):
    path = _save(TENSORS, tmp_path / "w.pth")
    weights.load_state_dict(path, lambda _: None)
    cached = _cached(path)
    cached.write_bytes(b"garbage")
    with pytest.raises(Exception) as library:  # whatever safetensors raises
        load_file(cached)
    used: list[dict] = []
    weights.load_state_dict(path, used.append)
    assert torch.equal(used[0]["a"], TENSORS["a"])
    assert _warnings(caplog) == [f"cached {cached} unusable ({library.value}); converting again"]


def test_a_vanished_leftover_is_no_error(tmp_path):
    """A leftover removed by another process between listing and looking at it."""
    path = _save(TENSORS, tmp_path / "w.pth")
    cached = _cached(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    (cached.parent / f".{cached.name}.g0ne.tmp").symlink_to(tmp_path / "nothing")
    weights.load_state_dict(path, lambda _: None)
    assert cached.is_file()


def test_a_files_hash_is_computed_once_while_it_is_unchanged(tmp_path, monkeypatch):
    path = _save(TENSORS, tmp_path / "w.pth")
    hashed: list[Path] = []
    monkeypatch.setattr(weights, "sha256_file", lambda p: hashed.append(p) or sha256(p))
    assert weights.cached_sha256(path) == weights.cached_sha256(path) == sha256(path)
    assert hashed == [path]
    os.utime(path, ns=(1, 1))  # touched: hashed again
    assert weights.cached_sha256(path) == sha256(path) and hashed == [path, path]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("remembered", "trusted"),
    [(HEX, True), (HEX[:-1], False), (HEX + "0", False), (HEX.upper(), False),
     ("X" + HEX[1:], False), (5, False)],
)  # fmt: skip
def test_only_a_well_formed_remembered_hash_is_trusted(tmp_path, remembered, trusted):
    """The memo is a cache file like any other: a value that is no sha256 is hashed again."""
    path = _save(TENSORS, tmp_path / "w.pth")
    st = path.stat()
    memo = weights.weights_cache_dir() / "hashes.json"
    memo.parent.mkdir(parents=True)
    memo.write_text(json.dumps({f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}": remembered}))
    assert weights.cached_sha256(path) == (remembered if trusted else sha256(path))


def test_a_hash_that_cannot_be_remembered_says_where(tmp_path, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "weights").write_text("a file where the folder should be")
    path = _save(TENSORS, tmp_path / "w.pth")
    assert weights.cached_sha256(path) == sha256(path)
    memo = tmp_path / "cache" / "weights" / "hashes.json"
    [warning] = _warnings(caplog)
    assert warning.startswith(f"could not remember the hash of {path} in {memo}: [Errno 17] ")
