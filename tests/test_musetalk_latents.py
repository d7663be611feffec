"""The per-avatar MuseTalk cache (musetalk.npz + musetalk.json): used when whole, rebuilt when
damaged or made for another image, landmarks or VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from livecam.avatar.store import avatar_dir, load_avatar
from livecam.engines.musetalk import avatar_latents
from livecam.engines.musetalk.avatar_latents import MANIFEST, NPZ, prepare_latents
from livecam.hashing import sha256_array
from tests.musetalk_tiny import tiny_vae


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_vae().eval()


@pytest.fixture()
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts VAE encodes: each one means the cache was not used."""
    calls: list[int] = []
    real = avatar_latents.encode_latents

    def counting(vae, crop):
        calls.append(1)
        return real(vae, crop)

    monkeypatch.setattr(avatar_latents, "encode_latents", counting)
    return calls


def _prepare(vae, vae_id: str = "vae-a", shift: float = 0.0):
    avatar = load_avatar("astronaut")
    return prepare_latents("astronaut", avatar.image, avatar.landmarks + shift, vae, vae_id)


def _rewrite(folder: Path, change, *, rehash: bool) -> None:
    """Rewrite musetalk.npz (a valid zip) after `change(arrays)`; with rehash, the manifest's
    checksums are made to match, so only the cache key can tell it apart."""
    with np.load(folder / NPZ) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    with (folder / NPZ).open("wb") as fh:
        np.savez(fh, **arrays)
    if rehash:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["arrays"] = {k: sha256_array(v) for k, v in arrays.items()}
        (folder / MANIFEST).write_text(json.dumps(manifest))


def _mark(arrays: dict) -> None:
    arrays["latents"] = np.full_like(arrays["latents"], 7.0)


def test_whole_cache_is_loaded_not_rebuilt(cache: Path, vae, encodes: list[int]) -> None:
    first = _prepare(vae)
    assert encodes == [1] and first.latents.shape == (1, 8, 32, 32)
    folder = avatar_dir("astronaut")
    _rewrite(folder, _mark, rehash=True)  # a consistent cache entry with recognisable data
    again = _prepare(vae)
    assert encodes == [1]  # no encode: the file was used
    assert (again.latents == 7.0).all()
    assert again.box == first.box and np.array_equal(again.mask, first.mask)


def test_damaged_arrays_are_rebuilt(cache: Path, vae, encodes: list[int]) -> None:
    first = _prepare(vae)
    folder = avatar_dir("astronaut")
    _rewrite(folder, _mark, rehash=False)  # zip CRCs fine, the sha256 in musetalk.json not
    again = _prepare(vae)
    assert encodes == [1, 1]
    assert np.array_equal(again.latents, first.latents)
    (folder / NPZ).write_bytes(b"truncated")
    assert np.array_equal(_prepare(vae).latents, first.latents)
    assert len(encodes) == 3
    _prepare(vae)
    assert len(encodes) == 3  # whole again after the rebuild


@pytest.mark.parametrize("what", ["vae", "landmarks", "format"])
def test_another_key_is_rebuilt(
    cache: Path, vae, encodes: list[int], monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    _prepare(vae)
    _rewrite(avatar_dir("astronaut"), _mark, rehash=True)
    if what == "format":
        monkeypatch.setattr(avatar_latents, "FORMAT_VERSION", avatar_latents.FORMAT_VERSION + 1)
    again = _prepare(vae, vae_id="vae-b" if what == "vae" else "vae-a",
                     shift=1.0 if what == "landmarks" else 0.0)  # fmt: skip
    assert encodes == [1, 1]
    assert not (again.latents == 7.0).any()
    manifest = json.loads((avatar_dir("astronaut") / MANIFEST).read_text())
    assert manifest["key"]["vae"] == ("vae-b" if what == "vae" else "vae-a")
