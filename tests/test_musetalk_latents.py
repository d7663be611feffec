"""The per-avatar MuseTalk cache (musetalk.npz + musetalk.json): used when whole, rebuilt when
damaged or made for another image, landmarks or VAE."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from livecam.avatar import cachedir
from livecam.avatar.store import avatar_dir, load_avatar
from livecam.engines.musetalk import avatar_latents
from livecam.engines.musetalk.avatar_latents import MANIFEST, NPZ, face_box, prepare_latents
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
    assert np.array_equal(again.crop, first.crop) and again.crop.shape == (256, 256, 3)


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


def _face(x: tuple[float, float], nose_y: float, chin_y: float) -> np.ndarray:
    """68 landmarks spanning x[0]..x[1], nose point 29 at nose_y, the lowest at chin_y."""
    pts = np.zeros((68, 2), np.float32)
    pts[:, 0] = np.linspace(x[0], x[1], 68)
    pts[:, 1] = np.linspace(nose_y - 20, chin_y, 68)
    pts[29, 1] = nose_y
    return pts


def test_face_box_as_musetalk_defines_it() -> None:
    # x from the landmarks' extent, bottom 10 px under the chin, top the nose mirrored above
    assert face_box(_face((100, 200), 150, 230), (400, 300, 3)) == (100, 70, 200, 240)
    # coordinates truncated to int, as MuseTalk does
    truncated = face_box(_face((100.9, 200.9), 150.9, 230.9), (400, 300))
    assert truncated == (100, 70, 200, 240)
    # clipped to the image: top above it, sides past it, the margin under its bottom
    assert face_box(_face((-5, 305), 60, 230), (235, 300)) == (0, 0, 300, 235)


def test_a_face_box_under_8_pixels_is_refused() -> None:
    assert face_box(_face((100, 108), 150, 230), (400, 300)) == (100, 70, 108, 240)
    with pytest.raises(ValueError, match="too small"):
        face_box(_face((100, 107), 150, 230), (400, 300))
    exactly_8 = face_box(_face((100, 200), 150, 154), (400, 300), margin=0)
    assert exactly_8 == (100, 146, 200, 154)
    with pytest.raises(ValueError, match="too small"):
        face_box(_face((100, 200), 150, 153), (400, 300), margin=1)


def test_blend_mask_covers_the_jaw_below_the_middle_feathered() -> None:
    """A 100 px box: the mask is eroded by 2 px and blurred with sigma 3.5 px (0.035 of the
    width), so 16 px (2 + 4 sigma) from the polygon's edge it is 0 or 1 within 1e-3."""
    t = np.linspace(0, 1, 15)
    pts = np.zeros((68, 2), np.float32)
    pts[1:16, 0] = 10 + 80 * t  # the jaw: a U from (10, 50) down to y 90 and up to (90, 50)
    pts[1:16, 1] = 50 + 40 * np.sin(np.pi * t)
    pts += np.array([30, 20], np.float32)  # the box sits at (30, 20) in the image
    mask = avatar_latents.blend_mask(pts, (30, 20, 130, 120))
    assert mask.shape == (100, 100, 1) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask[:34].max() < 1e-3  # above the middle line (50) less 16 px
    assert mask[68, 50, 0] > 0.999  # inside the jaw, 18 px under the middle line
    assert mask[95, 5, 0] < 1e-3 and mask[95, 95, 0] < 1e-3  # outside the jaw
    column = mask[40:61, 50, 0]  # across the top edge: a soft ramp, not a step
    # a sigma of 3.5 px puts 11 px (+-1.64 sigma) between 0.05 and 0.95
    assert np.all(np.diff(column) >= 0) and ((column > 0.05) & (column < 0.95)).sum() >= 9


def test_vae_input_is_rgb_in_minus_one_to_one_with_the_lower_half_blanked() -> None:
    crop = np.zeros((1, 256, 256, 3), np.uint8)
    crop[..., 0], crop[..., 2] = 255, 51  # BGR: blue full, red 0.2
    full = avatar_latents.to_vae_input(crop, lower_half_zeroed=False)
    assert full.shape == (1, 3, 256, 256) and full.dtype == torch.float32
    assert torch.allclose(full[0, :, 0, 0], torch.tensor([-0.6, -1.0, 1.0]))  # R, G, B
    half = avatar_latents.to_vae_input(crop, lower_half_zeroed=True)
    assert torch.equal(half[:, :, :128], full[:, :, :128])
    assert (half[:, :, 128:] == -1.0).all()  # black (0) before the normalisation


def test_the_crop_is_resized_with_lanczos_as_musetalk_does() -> None:
    """A sharp edge between grey 50 and 200, enlarged: Lanczos rings (values past both sides
    next to the edge); linear or nearest interpolation stay between the two."""
    image = np.full((100, 100, 3), 50, np.uint8)
    image[:, 50:] = 200
    crop = avatar_latents.crop_face(image, (0, 0, 100, 100))
    assert crop.shape == (256, 256, 3)
    assert crop.min() < 50 and crop.max() > 200


@pytest.mark.parametrize(
    "content", ["[]", '"text"', "{}", '{"key": 1}', '{"key": {}, "arrays": []}']
)
def test_a_manifest_off_its_schema_is_rebuilt_not_a_crash(
    cache: Path, vae, encodes: list[int], content: str
) -> None:
    first = _prepare(vae)
    (avatar_dir("astronaut") / MANIFEST).write_text(content)
    again = _prepare(vae)
    assert encodes == [1, 1] and np.array_equal(again.latents, first.latents)
    _prepare(vae)
    assert encodes == [1, 1]  # whole again


def test_a_consistent_cache_without_one_array_is_rebuilt(
    cache: Path, vae, encodes: list[int]
) -> None:
    first = _prepare(vae)
    _rewrite(avatar_dir("astronaut"), lambda arrays: arrays.pop("mask"), rehash=True)
    assert np.array_equal(_prepare(vae).mask, first.mask)  # checksums match, the set does not
    assert encodes == [1, 1]


def test_damaged_arrays_are_named_in_the_warning(
    cache: Path, vae, caplog: pytest.LogCaptureFixture
) -> None:
    _prepare(vae)
    folder = avatar_dir("astronaut")
    _rewrite(folder, _mark, rehash=False)
    with caplog.at_level("WARNING", logger="livecam.engines.musetalk.avatar_latents"):
        _prepare(vae)
    [message] = [r.getMessage() for r in caplog.records]
    live = cachedir.live_dir(folder.parent, "astronaut")  # the version folder the link names
    assert message.startswith(f"musetalk avatar data in {live} damaged (")
    assert "latents" in message and message.endswith("); rebuilding")


def _rectangle_jaw(s: float) -> np.ndarray:
    """Jaw points 1..15 outlining the rectangle x 10..90, y 50..94 of a 100 s px box (scaled
    by s), its corners far from their neighbours; points 0 and 16 far away."""
    pts = np.zeros((68, 2), np.float32)
    pts[1], pts[15] = (10, 94), (90, 94)
    pts[2:15] = (50, 94)
    pts[0], pts[16] = (0, 0), (99, 0)
    return pts * s


@pytest.mark.parametrize(("s", "area"), [(1.0, 77 * 41), (0.5, 39 * 21)])
def test_blend_mask_fills_the_jaw_eroded_by_its_kernel(s: float, area: int) -> None:
    """fillPoly covers 81 x 45 px (41 x 23 at half size); the kernel (5 px, 3 px under 75 px)
    takes 2 px (1 px) off each side, and the blur keeps the sum (it is 5 sigma from the edge
    of the box, at most): the sum is the eroded area within 1 %."""
    mask = avatar_latents.blend_mask(_rectangle_jaw(s), (0, 0, round(100 * s), round(100 * s)))
    assert abs(float(mask.sum()) - area) < 0.01 * area
    row = mask[round(72 * s), : round(30 * s), 0]  # across the left side: feathered too
    assert ((row > 0.05) & (row < 0.95)).sum() >= round(9 * s)


def test_a_small_face_is_feathered_by_one_pixel_at_least() -> None:
    """A 20 px box: 0.035 of its width is 0.7 px, under the blur's 1 px floor. The ramp from
    0.05 to 0.95 spans +-1.64 sigma (3-4 px), and the middle of the 8 px tall jaw, 3 sigma from
    its edges, is fully 1."""
    row = avatar_latents.blend_mask(_rectangle_jaw(0.2), (0, 0, 20, 20))[14, :, 0]
    assert row[8:12].min() > 0.999
    assert 3 <= ((row[:10] > 0.05) & (row[:10] < 0.95)).sum() <= 4


def test_the_cache_is_written_under_the_lock_of_its_avatar(cache: Path, vae) -> None:
    load_avatar("astronaut")  # its cache folder, without musetalk data yet
    folder = avatar_dir("astronaut")
    assert not (folder / MANIFEST).exists()
    with cachedir.locked(cache / "avatars", "astronaut"):  # a writer or remover of the avatar
        writer = threading.Thread(target=_prepare, args=(vae,))
        writer.start()
        writer.join(timeout=1.0)  # a slow machine can only make this pass wrongly, never fail
        assert writer.is_alive() and not (folder / MANIFEST).exists()
    writer.join()
    assert (folder / MANIFEST).exists()


def test_a_failed_cache_write_still_gives_the_data_and_says_why(
    cache: Path, vae, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    avatar = load_avatar("astronaut")

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(avatar_latents.cachefile, "save_arrays", full)
    with caplog.at_level("WARNING", logger="livecam.engines.musetalk.avatar_latents"):
        data = prepare_latents("astronaut", avatar.image, avatar.landmarks, vae, "vae-a")
    assert data.latents.shape == (1, 8, 32, 32)
    assert [r.getMessage() for r in caplog.records] == [
        "could not cache musetalk data of avatar 'astronaut': [Errno 28] No space left on device"
    ]
    assert not (avatar_dir("astronaut") / MANIFEST).exists()


def test_an_avatar_without_a_cache_folder_keeps_its_data_in_memory_quietly(
    cache: Path, vae, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote client's upload has no folder here: nothing to cache into, nothing to say."""
    avatar = load_avatar("astronaut")
    with caplog.at_level("DEBUG", logger="livecam.engines.musetalk.avatar_latents"):
        data = prepare_latents("remote-0123", avatar.image, avatar.landmarks, vae, "vae-a")
    assert data.latents.shape == (1, 8, 32, 32) and not caplog.records
    assert not (cache / "avatars" / "remote-0123").exists()
