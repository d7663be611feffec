"""Per-avatar MuseTalk data: face crop box, 256x256 crop, its two VAE latents, blend mask.

Box (as MuseTalk v1.5 computes it from the 68 landmarks): x from the landmarks' extent,
bottom = lowest landmark + `extra_margin` (10 px), top = nose point 29 mirrored above by the
nose-to-chin distance. The UNet input is cat(latent of the crop with its lower half zeroed,
latent of the full crop): (1, 8, 32, 32). The blend mask (our replacement for MuseTalk's
face-parsing mask) covers the jaw polygon below the crop's middle line, feathered.

Cached in the avatar's cache folder (musetalk.npz + musetalk.json) with one sha256 per array
and the VAE weights' hash, so a changed avatar or VAE is noticed and the data rebuilt. Both
files are written under the avatar's lock through temporaries renamed into place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from livecam import cachefile
from livecam.avatar import cachedir
from livecam.avatar.store import avatars_root
from livecam.hashing import sha256_array

log = logging.getLogger(__name__)

FACE_SIZE = 256
EXTRA_MARGIN = 10  # v1.5: extra pixels below the chin
FORMAT_VERSION = 1
NPZ, MANIFEST = "musetalk.npz", "musetalk.json"


@dataclass
class AvatarLatents:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in avatar image coords
    crop: np.ndarray  # (256, 256, 3) uint8 BGR
    latents: np.ndarray  # (1, 8, 32, 32) float32: masked-crop latent, full-crop latent
    mask: np.ndarray  # (y2 - y1, x2 - x1, 1) float32 in [0, 1]


def face_box(landmarks: np.ndarray, shape: tuple[int, ...], margin: int = EXTRA_MARGIN) -> tuple:
    pts = np.asarray(landmarks).astype(np.int32)  # MuseTalk truncates to int as well
    h, w = shape[:2]
    nose_y = int(pts[29, 1])
    chin_y = int(pts[:, 1].max())
    top = nose_y - (chin_y - nose_y)
    x1, x2 = int(pts[:, 0].min()), int(pts[:, 0].max())
    box = (max(x1, 0), max(top, 0), min(x2, w), min(chin_y + margin, h))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        raise ValueError(f"face box {box} is too small for MuseTalk")
    return box


def crop_face(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    crop = image[y1:y2, x1:x2]
    return cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


def blend_mask(landmarks: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Feathered lower-face mask in box coordinates: the jaw polygon below the box middle."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    pts = np.asarray(landmarks, dtype=np.float32) - (x1, y1)
    mid = bh * 0.5
    jaw = pts[1:16].copy()
    jaw[:, 1] = np.maximum(jaw[:, 1], mid)
    poly = np.vstack([[jaw[0, 0], mid], jaw, [jaw[-1, 0], mid]]).round().astype(np.int32)
    mask = np.zeros((bh, bw), np.float32)
    cv2.fillPoly(mask, [poly], 1.0)
    # pull the edge inwards, then feather, so the seam fades inside the face
    k = max(3, int(0.04 * bw) | 1)
    mask = cv2.erode(mask, np.ones((k, k), np.uint8))
    sigma = max(1.0, 0.035 * bw)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    return mask[..., None]


def to_vae_input(crops_bgr: np.ndarray, lower_half_zeroed: bool) -> torch.Tensor:
    """(B, 256, 256, 3) uint8 BGR -> (B, 3, 256, 256) RGB in [-1, 1] (MuseTalk's preprocessing)."""
    x = torch.from_numpy(crops_bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255.0
    if lower_half_zeroed:
        x[:, :, FACE_SIZE // 2 :] = 0.0  # zeroed before normalization, as MuseTalk does
    return x * 2.0 - 1.0


@torch.inference_mode()
def encode_latents(vae: torch.nn.Module, crop: np.ndarray) -> np.ndarray:
    """(1, 8, 32, 32): [masked crop latent, full crop latent], scaled by the VAE's factor.

    MuseTalk samples the latent distribution; the mean is used here so results are
    deterministic (the posterior's std is tiny for this VAE).
    """
    p = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    out = []
    for half in (True, False):
        x = to_vae_input(crop[None], half).to(p.device, p.dtype)
        out.append(vae.encode(x).latent_dist.mean * scale)
    return torch.cat(out, dim=1).float().cpu().numpy()


def _key(image: np.ndarray, landmarks: np.ndarray, vae_id: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "image": sha256_array(image),
        "landmarks": sha256_array(np.asarray(landmarks, np.float32)),
        "vae": vae_id,
        "extra_margin": EXTRA_MARGIN,
    }


_ARRAYS = ("box", "crop", "latents", "mask")


def _valid_manifest(data: Any) -> bool:
    """{"key": {...}, "arrays": {name: sha256} for exactly _ARRAYS}: anything else is damage."""
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
        return False
    arrays = data.get("arrays")
    return (isinstance(arrays, dict) and sorted(arrays) == sorted(_ARRAYS)
            and all(isinstance(v, str) for v in arrays.values()))  # fmt: skip


def _load(folder: Path, key: dict) -> AvatarLatents | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):  # missing or unreadable: rebuild
        return None
    if not _valid_manifest(manifest) or manifest["key"] != key:
        return None
    try:
        arrays = cachefile.load_arrays(folder / NPZ, manifest["arrays"])
    except ValueError as exc:
        if (folder / NPZ).exists():
            log.warning("musetalk avatar data in %s damaged (%s); rebuilding", folder, exc)
        return None
    box = tuple(int(v) for v in arrays["box"])
    return AvatarLatents(box, arrays["crop"], arrays["latents"], arrays["mask"])  # type: ignore[arg-type]


def _save(name: str, key: dict, data: AvatarLatents) -> None:
    arrays = {
        "box": np.array(data.box, np.int32),
        "crop": data.crop,
        "latents": data.latents,
        "mask": data.mask,
    }
    root = avatars_root()
    with cachedir.locked(root, name):
        folder = cachedir.live_dir(root, name)
        if folder is None:
            raise OSError(f"avatar {name!r} has no cache folder")
        # the data first, then the manifest naming its checksums: a writer killed between
        # the two leaves a mismatch, which reads as "rebuild", never as wrong data
        manifest = {"key": key, "arrays": cachefile.save_arrays(folder / NPZ, arrays)}
        cachefile.replace_file(
            folder / MANIFEST, lambda fh: fh.write(json.dumps(manifest).encode())
        )


def prepare_latents(
    name: str, image: np.ndarray, landmarks: np.ndarray, vae: torch.nn.Module, vae_id: str
) -> AvatarLatents:
    """Cached MuseTalk data for an avatar's neutral frame, built on first use."""
    key = _key(image, landmarks, vae_id)
    root = avatars_root()
    folder = cachedir.live_dir(root, name)
    cached = _load(folder, key) if folder is not None else None
    if cached is not None:
        return cached
    box = face_box(landmarks, image.shape)
    crop = crop_face(image, box)
    data = AvatarLatents(box, crop, encode_latents(vae, crop), blend_mask(landmarks, box))
    if folder is None:  # nowhere to keep it (a remote client's upload): in memory only
        return data
    try:
        _save(name, key, data)
    except OSError as exc:  # a read-only or full cache is not fatal: the data is in memory
        log.warning("could not cache musetalk data of avatar %r: %s", name, exc)
    return data
