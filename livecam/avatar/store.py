"""Avatar cache: prepare once per photo or clip, verify on load, rebuild when stale or damaged.

Layout: cache_root()/avatars/NAME/{manifest.json, arrays.npz}, NAME a pointer to a version
folder that a rebuild replaces in one rename (see cachedir). The manifest records the
format version, source path and sha256, build parameters and one sha256 per array, so a
stale or corrupt cache is detected and rebuilt, never silently used. Bundled avatars
(avatars/NAME/avatar.toml plus a photo) are prepared automatically on first use.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import tomllib
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livecam import cachefile
from livecam.avatar import cachedir, video
from livecam.avatar.eyes import build_eye_bank
from livecam.avatar.landmarks import (
    LANDMARKER,
    FaceDetection,
    FaceModelError,
    NoFaceError,
    detect_face,
)
from livecam.avatar.model import Avatar, BankParams, PatchBank
from livecam.avatar.mouth import build_mouth_bank
from livecam.hashing import sha256_file
from livecam.limits import MAX_IMAGE_PIXELS, LimitError, check_pixels
from livecam.paths import cache_home

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_HEIGHT = 720  # stills are downscaled to at most this height at prepare time
ENGINES = ["lite"]
MANIFEST, ARRAYS = "manifest.json", "arrays.npz"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AvatarError(Exception):
    """A user-facing avatar problem; the message says what to do."""


@dataclass(frozen=True)
class AvatarInfo:
    name: str
    kind: str  # "bundled" | "prepared"
    status: str  # "ready" | "not prepared" | "stale"
    source: Path | None
    description: str


def cache_root() -> Path:
    """$LIVECAM_CACHE_DIR, else $XDG_CACHE_HOME/livecam, else ~/.cache/livecam."""
    if env := os.environ.get("LIVECAM_CACHE_DIR"):
        return Path(env)
    return cache_home() / "livecam"


def bundled_root() -> Path:
    """$LIVECAM_AVATARS_DIR, else the avatars shipped in the package (in a checkout, a link
    to the repository's avatars/ folder)."""
    if env := os.environ.get("LIVECAM_AVATARS_DIR"):
        return Path(env)
    return Path(__file__).resolve().parents[1] / "avatars"


def avatars_root() -> Path:
    return cache_root() / "avatars"


def avatar_dir(name: str) -> Path:
    """Where NAME's cache is reached (a pointer to its current version)."""
    _check_name(name)
    return avatars_root() / name


def build_params() -> dict[str, Any]:
    clip = {"seconds": video.MAX_SECONDS, "rate": video.FRAME_RATE, "height": video.MAX_HEIGHT}
    return {**BankParams().as_dict(), "max_height": MAX_HEIGHT, "video": clip,
            "landmarker": LANDMARKER}  # fmt: skip


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise AvatarError(
            f"invalid avatar name {name!r}: use letters, digits, '-', '_' or '.' (max 64)"
        )


# avatar.toml: what a bundled avatar must say, and of which type (the rest is free text)
_BUNDLED_TYPES = {"source": str, "description": str}


def _bundled(name: str) -> dict[str, Any] | None:
    """The bundled avatar.toml for name (with 'source' made absolute), or None; AvatarError
    if it is not a table of the expected keys ($LIVECAM_AVATARS_DIR may be anyone's)."""
    path = bundled_root() / name / "avatar.toml"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            meta = tomllib.load(fh)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AvatarError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta.get("source"), str) or any(
        key in meta and type(meta[key]) is not kind for key, kind in _BUNDLED_TYPES.items()
    ):
        raise AvatarError(
            f"{path} is damaged: it needs source (a file name), and description, where "
            "given, as a string"
        )
    meta["source"] = path.parent / meta["source"]
    return meta


def _bundled_names() -> list[str]:
    return sorted(p.parent.name for p in bundled_root().glob("*/avatar.toml"))  # none: []


def _cached_names() -> list[str]:
    """Cached avatars (valid names with a cache folder; leftovers and stray files ignored)."""
    root = avatars_root()
    return [n for n in cachedir.names(root)
            if _NAME_RE.fullmatch(n) and cachedir.live_dir(root, n) is not None]  # fmt: skip


def check_image(path: Path) -> None:
    """Refuse, before decoding, an image over the pixel limit; and a damaged (e.g. cut off)
    one, which cv2 would decode silently with grey where the data ends."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is lower
            with Image.open(path) as im:
                check_pixels(f"image {path}", *im.size)
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # JPEG: fast
                im.load()  # decodes every byte of the data: raises if it is cut short
    except LimitError as exc:
        raise AvatarError(str(exc)) from None
    except Image.DecompressionBombError:
        raise AvatarError(f"image {path} is larger than {MAX_IMAGE_PIXELS // 1_000_000} "
                          "megapixels; scale it down first") from None  # fmt: skip
    except (OSError, SyntaxError, ValueError) as exc:
        raise AvatarError(f"cannot read image {path}: damaged or not an image ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    """A BGR uint8 still, downscaled to MAX_HEIGHT if taller."""
    if not path.is_file():
        raise AvatarError(f"cannot read image {path}: not a readable image file")
    check_image(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise AvatarError(f"cannot read image {path}: not a readable image file")
    return _fit_height(image)


def _fit_height(image: np.ndarray) -> np.ndarray:
    if image.shape[0] <= MAX_HEIGHT:
        return image
    scale = MAX_HEIGHT / image.shape[0]
    size = (max(1, round(image.shape[1] * scale)), MAX_HEIGHT)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _upright(image: np.ndarray, source: Path) -> tuple[np.ndarray, FaceDetection, list[str]]:
    """The photo turned by quarter turns so that the face is upright (a photo on its side
    or upside down with no orientation in its file), its face, and a warning if turned."""
    det = detect_face(image)
    eyes = det.landmarks[45] - det.landmarks[36]  # the person's right eye to the left
    turns = round(math.atan2(eyes[1], eyes[0]) / (math.pi / 2)) % 4  # the face's roll
    if turns == 0:
        return image, det, []
    image = _fit_height(np.ascontiguousarray(np.rot90(image, turns)))  # counterclockwise
    turned = f"the face in {source} was on its side or upside down: the photo was turned upright"
    log.warning(turned)
    return image, detect_face(image), [turned]


def build_avatar(name: str, source: Path) -> Avatar:
    """Detect the face and render the lite banks (no cache involved); a photo of several
    faces gets a warning."""
    if video.is_video(source):
        return _build_video_avatar(name, source)
    try:
        image, det, warnings = _upright(read_image(source), source)
    except NoFaceError:
        raise AvatarError(
            f"no face found in {source}: use a photo with one clearly visible, frontal face "
            "(a face smaller than 1/30 of the picture's width: crop the photo around it)"
        ) from None
    except FaceModelError as exc:
        raise AvatarError(str(exc)) from None
    if det.faces_found > 1:
        warnings.append(f"{det.faces_found} faces found in {source}; using the largest one")
        log.warning(warnings[-1])
    params = BankParams()
    mouth = build_mouth_bank(image, det.landmarks, params)
    eyes = build_eye_bank(image, det.landmarks, params, max_y=mouth.y)
    return Avatar(name, image, det.landmarks, mouth, eyes, warnings)


def _build_video_avatar(name: str, source: Path) -> Avatar:
    """Banks on the first frame; the clip aligned to it, with the head motion to replay."""
    try:
        frames, rate = video.read_clip(source)
        aligned, motion, points = video.stabilize(frames, video.track_landmarks(frames))
    except NoFaceError:
        raise AvatarError(
            f"no face found in the first frame of {source}: start the clip on one clearly "
            "visible, frontal face"
        ) from None
    except (video.VideoError, FaceModelError) as exc:
        raise AvatarError(str(exc)) from None
    image, landmarks, params = aligned[0], points[0].astype(np.float32), BankParams()
    mouth = build_mouth_bank(image, landmarks, params)
    eyes = build_eye_bank(image, landmarks, params, max_y=mouth.y)
    log.info("avatar %r: %d frames of %s", name, len(aligned), source)
    return Avatar(name, image, landmarks, mouth, eyes, [], aligned, motion, rate)


def _to_arrays(av: Avatar) -> dict[str, np.ndarray]:
    arrays = {"image": av.image, "landmarks": av.landmarks.astype(np.float32)}
    for key, bank in (("mouth", av.mouth), ("eyes", av.eyes)):
        arrays[f"{key}_patches"] = bank.patches
        arrays[f"{key}_mask"] = bank.mask.astype(np.float32)
        arrays[f"{key}_xy"] = np.array([bank.x, bank.y], np.int32)
    if av.frames is not None and av.motion is not None:
        arrays["frames"], arrays["motion"] = av.frames, av.motion
        arrays["clip_rate"] = np.array(av.clip_rate, np.float64)
    return arrays


def _from_arrays(name: str, arrays: dict[str, np.ndarray], warnings: list[str]) -> Avatar:
    def bank(key: str) -> PatchBank:
        x, y = (int(v) for v in arrays[f"{key}_xy"])
        return PatchBank(x, y, arrays[f"{key}_patches"], arrays[f"{key}_mask"])

    rate = float(arrays["clip_rate"]) if "clip_rate" in arrays else 0.0
    return Avatar(name, arrays["image"], arrays["landmarks"], bank("mouth"), bank("eyes"),
                  warnings, arrays.get("frames"), arrays.get("motion"), rate)  # fmt: skip


def _write_cache(av: Avatar, source: Path, kind: str, description: str) -> None:
    """Write manifest + arrays into a new version folder, then point the name at it."""
    arrays = _to_arrays(av)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": av.name,
        "kind": kind,
        "description": description,
        "source": str(source.resolve()),
        "source_sha256": sha256_file(source),
        "params": build_params(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "engines": ENGINES,
        "arrays": cachefile.checksums(arrays),
        "warnings": av.warnings,
    }
    root = avatars_root()
    try:
        with cachedir.locked(root, av.name):  # concurrent writers of one name queue here
            version = cachedir.new_version(root, av.name)
            try:
                cachefile.save_arrays(version / ARRAYS, arrays)
                (version / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                cachedir.publish(root, av.name, version)
            except BaseException:
                cachedir.remove(version)
                raise
    except OSError as exc:
        raise AvatarError(_write_error(av.name, root, exc)) from None


def _write_error(name: str, root: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left to save avatar {name!r} in {root}: free some disk space "
                "(or set LIVECAM_CACHE_DIR to another disk) and try again")  # fmt: skip
    return f"cannot save avatar {name!r} in {root}: {exc.strerror or exc}"


# The manifest's schema: anything else is a damaged cache (rebuilt), never a TypeError.
_MANIFEST_TYPES = {"format_version": int, "name": str, "kind": str, "description": str,
                   "source": str, "source_sha256": str, "params": dict, "arrays": dict,
                   "warnings": list}  # fmt: skip


def _valid_manifest(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and all(isinstance(data.get(k), t) for k, t in _MANIFEST_TYPES.items())
        and data["kind"] in ("bundled", "prepared")
        and all(isinstance(k, str) and isinstance(v, str) for k, v in data["arrays"].items())
        and all(isinstance(w, str) for w in data["warnings"])
    )


def _read_manifest(name: str) -> dict[str, Any] | None:
    """The cache's manifest if it is whole and well-formed, else None."""
    folder = cachedir.live_dir(avatars_root(), name)
    if folder is None:
        return None
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if _valid_manifest(data) else None


def _damaged(name: str) -> bool:
    """A cache folder is there but its manifest is unusable."""
    return cachedir.live_dir(avatars_root(), name) is not None and _read_manifest(name) is None


def _stale_reason(manifest: dict[str, Any], source: Path) -> str | None:
    """Why the cache no longer matches its source and parameters (None: it matches)."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"cache format {manifest.get('format_version')} != {FORMAT_VERSION}"
    if manifest.get("params") != build_params():
        return "build parameters changed"
    if not source.is_file():
        return f"source {source} is missing"
    if manifest.get("source_sha256") != sha256_file(source):
        return f"source {source} changed"
    return None


def _load_cache(name: str, manifest: dict[str, Any]) -> Avatar:
    """Load and verify the arrays; raises ValueError (with the reason) if damaged."""
    folder = cachedir.live_dir(avatars_root(), name)
    if folder is None:
        raise ValueError("the cache folder is gone")
    arrays = cachefile.load_arrays(folder / ARRAYS, manifest["arrays"])
    return _from_arrays(name, arrays, list(manifest["warnings"]))


def _source_of(name: str, manifest: dict[str, Any] | None) -> tuple[Path, str, str]:
    """(source path, kind, description) for a known avatar (`manifest`: its valid one, or
    None), else AvatarError."""
    if manifest is not None and manifest["kind"] == "prepared":
        return Path(manifest["source"]), "prepared", manifest["description"]
    meta = _bundled(name)
    if meta is not None:
        return Path(meta["source"]), "bundled", str(meta.get("description", ""))
    if manifest is not None:  # a bundled avatar's cache, its bundle gone: now it is yours
        return Path(manifest["source"]), "prepared", manifest["description"]
    if _damaged(name):
        raise AvatarError(
            f"the cache of avatar {name!r} in {avatars_root()} is damaged: make it again with "
            f"`livecam avatars prepare {name} --from PHOTO_OR_CLIP --force`"
        )
    names = sorted(set(_bundled_names()) | set(_cached_names()))
    raise AvatarError(
        f"unknown avatar {name!r}; available: {', '.join(names) or 'none'}. "
        f"Make one with `livecam avatars prepare {name} --from PHOTO_OR_CLIP`"
    )


def prepare_avatar(name: str, source: Path, *, force: bool = False) -> Avatar:
    """Build (or reuse, unless force) the cache for `name` from a photo or clip."""
    _check_name(name)
    source = Path(source)
    manifest = _read_manifest(name)
    meta = _bundled(name)
    is_bundled = meta is not None and Path(meta["source"]).resolve() == source.resolve()
    kind = "bundled" if is_bundled else "prepared"
    description = str(meta.get("description", "")) if is_bundled and meta else ""
    if not force and manifest is not None and manifest["kind"] == kind:
        same_source = Path(manifest["source"]) == source.resolve()
        if same_source and _stale_reason(manifest, source) is None:
            try:
                return _load_cache(name, manifest)
            except ValueError as exc:
                log.warning("avatar %r cache damaged (%s); rebuilding", name, exc)
    avatar = build_avatar(name, source)
    _write_cache(avatar, source, kind, description)
    return avatar


def load_avatar(name: str) -> Avatar:
    """The cached avatar, rebuilt from its source if missing, stale or damaged."""
    _check_name(name)
    manifest = _read_manifest(name)
    source, kind, description = _source_of(name, manifest)
    if manifest is None:
        reason = "cache damaged" if _damaged(name) else "not prepared yet"
    else:
        reason = _stale_reason(manifest, source)
        if reason is None:
            try:
                return _load_cache(name, manifest)
            except ValueError as exc:
                reason = f"cache damaged: {exc}"
    if not source.is_file():
        raise AvatarError(
            f"avatar {name!r} must be rebuilt ({reason}) but its source {source} is "
            f"gone: run `livecam avatars prepare {name} --from PHOTO_OR_CLIP`"
        )
    if manifest is not None or reason == "cache damaged":
        log.warning("avatar %r: %s; rebuilding from %s", name, reason, source)
    avatar = build_avatar(name, source)
    _write_cache(avatar, source, kind, description)
    return avatar


def list_avatars() -> list[AvatarInfo]:
    """Bundled and prepared avatars with their cache status (no array verification)."""
    out = []
    for name in sorted(set(_bundled_names()) | set(_cached_names())):
        manifest = _read_manifest(name)
        try:
            source, kind, description = _source_of(name, manifest)
        except AvatarError:  # a damaged prepared avatar: its source is unknown
            out.append(AvatarInfo(name, "prepared", "damaged", None, "prepare it again"))
            continue
        if manifest is None:
            status = "damaged" if _damaged(name) else "not prepared"
        else:
            status = "ready" if _stale_reason(manifest, source) is None else "stale"
        out.append(AvatarInfo(name, kind, status, source, description))
    return out


def remove_avatar(name: str) -> None:
    """Delete an avatar's cache (a bundled avatar is prepared again on next use). A symlink
    in its place is removed, never followed."""
    path = avatar_dir(name)
    if not path.is_symlink() and not path.exists():
        raise AvatarError(f"avatar {name!r} has no cache in {path.parent}")
    with cachedir.locked(path.parent, name):
        cachedir.discard(path.parent, name)
