"""The wire protocol between `livecam start --remote` and `livecam serve` (version 1).

Every WebSocket message is binary: a 4-byte big-endian header length, a UTF-8 JSON object
(the header, at most MAX_HEADER bytes, with a "type"), then an optional binary payload.

client -> server                               server -> client
  hello  {version, token, fps, idle,            ready  {stream, engine, tiers, batch_sizes,
          encoding, [host], [join {stream,               response_s, needed, key, encoding}
          key}]}
  avatar {sha256} [+ npz payload]                avatar {sha256, known}
  audio  {start} + float32 LE samples            faces  {id, stream, avatar, frames, patches,
  frames {id, avatar, frames, tier,                      encoding, late, ...} + patch bytes
          audio_start, [wait_ms]}
          [+ float32 samples]
                                                 error  {code, message}

The hello must come first and carry the token; nothing else is read before it is accepted.
A hello with "join" (the stream and the key its ready message gave) opens a second
connection of that stream: a client over a lossy network sends each request on both (same
id) and the server generates it once, answering on both.
A request's "wait_ms" is how long its client waits for the faces: one that queued longer
(an overloaded pool) is answered "late" with no faces, not made, so the queue drains.
Audio carries its absolute sample index; faces are keyed by the request id, the stream id
and the frame indices, so a reply can never be taken for another stream's or request's.
Faces travel as the image regions the engine changes (the client holds the avatar and pastes
them into its base image): raw uint8 (exact) or JPEG (about 10x smaller). A hello's encoding
"auto" (a client of a loopback address) is raw where its "host" is the server's own machine,
JPEG otherwise: a loopback address may be an SSH tunnel to another machine.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livecam.avatar.model import Avatar, PatchBank
from livecam.constants import HOPS_PER_SECOND, SAMPLE_RATE
from livecam.hashing import sha256_array
from livecam.limits import MAX_HEIGHT, MAX_WIDTH

VERSION = 1
PATH = "/v1/stream"
MAX_HEADER = 16 * 1024
MAX_AUDIO_SAMPLES = 2 * SAMPLE_RATE  # per audio message
MAX_FRAMES = 16  # per frames request
MAX_AVATAR_BYTES = 12 * 1024 * 1024  # under the Serve proxy's 16 MiB WebSocket message limit
MAX_MESSAGE = MAX_AVATAR_BYTES + MAX_HEADER + 4
MAX_WAIT_MS = 3_600_000  # a request's "wait_ms": up to an hour (an offline render waits)
MAX_FRAME_INDEX = 1 << 40  # ~1000 years at 30 fps: anything above is malformed
ENCODINGS = ("raw", "jpeg")
AUTO = "auto"  # a hello's encoding: raw on the server's own machine, else JPEG
HELLO_ENCODINGS = (*ENCODINGS, AUTO)
JPEG_QUALITY = 90
AVATAR_KEYS = {
    "image",
    "landmarks",
    "mouth_patches",
    "mouth_mask",
    "mouth_xy",
    "eyes_patches",
    "eyes_mask",
    "eyes_xy",
}

_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A malformed or oversized message; the text says what is wrong with it."""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head)) + head + payload


def unpack(data: bytes | str) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a message; ProtocolError for anything malformed or oversized."""
    if isinstance(data, str):
        raise ProtocolError("text messages are not part of the protocol: send binary")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    if len(data) < _LEN.size:
        raise ProtocolError("message shorter than its length prefix")
    (size,) = _LEN.unpack_from(data)
    if size > MAX_HEADER or _LEN.size + size > len(data):
        raise ProtocolError(f"header length {size} is over the limit or past the message")
    try:
        header = json.loads(data[_LEN.size : _LEN.size + size])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError('header must be a JSON object with a "type"')
    return header, bytes(data[_LEN.size + size :])


def field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A required header field of a given type (bool is not taken for int)."""
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f'"{name}" is missing or not {getattr(kind, "__name__", kind)}')
    return value


def wait_seconds(header: dict[str, Any]) -> float | None:
    """A request's optional "wait_ms": how long its client waits for the faces."""
    if "wait_ms" not in header:
        return None
    value = header["wait_ms"]
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 < value <= MAX_WAIT_MS
    ):
        raise ProtocolError(f'"wait_ms" must be milliseconds, over 0 and at most {MAX_WAIT_MS}')
    return value / 1e3


def frame_list(header: dict[str, Any]) -> list[int]:
    frames = field(header, "frames", list)
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"a request asks for 1 to {MAX_FRAMES} frames, not {len(frames)}")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in frames):
        raise ProtocolError("frame indices must be integers")
    if not all(0 <= a < b < MAX_FRAME_INDEX for a, b in itertools.pairwise(frames)):
        raise ProtocolError("frame indices must be increasing and non-negative")
    if not 0 <= frames[0] < MAX_FRAME_INDEX:
        raise ProtocolError("frame indices must be non-negative")
    return frames


def audio_samples(payload: bytes) -> np.ndarray:
    if len(payload) % 4 or not 0 < len(payload) // 4 <= MAX_AUDIO_SAMPLES:
        raise ProtocolError(f"audio must be 1 to {MAX_AUDIO_SAMPLES} float32 samples")
    samples = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError("audio contains NaN or infinity")
    return samples


# -- the engine's look-ahead -------------------------------------------------------------------
MAX_PERIOD = 10_000


def needed_table(samples_needed: Callable[[int], int], fps: float) -> dict[str, Any]:
    """The server engine's samples_needed as a table the client extends: both engines step in
    20 ms hops, so it repeats every `period` frames, shifted by `period / fps` seconds."""
    rate = Fraction(fps).limit_denominator(1001)
    period = rate.numerator // math.gcd(rate.numerator, HOPS_PER_SECOND * rate.denominator)
    shift = Fraction(period * SAMPLE_RATE) / rate
    if period > MAX_PERIOD or shift.denominator != 1:
        raise ProtocolError(f"frame rate {fps} has no short period on the 20 ms hop grid")
    return {
        "period": period,
        "shift": int(shift),
        "table": [samples_needed(k) for k in range(period)],
    }


def needed_from_table(info: Any) -> Callable[[int], int]:
    """samples_needed(frame) from a needed_table() (checked: it comes off the wire)."""
    if not isinstance(info, dict):
        raise ProtocolError("ready has no look-ahead table")
    period, shift, table = info.get("period"), info.get("shift"), info.get("table")
    if not (isinstance(period, int) and isinstance(shift, int) and isinstance(table, list)):
        raise ProtocolError("malformed look-ahead table")
    if not (0 < period == len(table) <= MAX_PERIOD and shift > 0):
        raise ProtocolError("malformed look-ahead table")
    if not all(isinstance(v, int) for v in table):
        raise ProtocolError("malformed look-ahead table")

    def samples_needed(frame: int) -> int:
        cycle, k = divmod(frame, period)
        return table[k] + cycle * shift

    return samples_needed


# -- avatars ------------------------------------------------------------------------------------
def avatar_blob(avatar: Avatar) -> tuple[str, bytes]:
    """(content hash, npz bytes) of what a remote lite engine needs of a still avatar."""
    if avatar.is_video:
        raise ProtocolError(
            f"avatar {avatar.name!r} is a video avatar; remote generation takes photo avatars"
        )
    arrays = {
        "image": avatar.image,
        "landmarks": avatar.landmarks.astype(np.float32),
        "mouth_patches": avatar.mouth.patches,
        "mouth_mask": avatar.mouth.mask.astype(np.float32),
        "mouth_xy": np.array([avatar.mouth.x, avatar.mouth.y], np.int32),
        "eyes_patches": avatar.eyes.patches,
        "eyes_mask": avatar.eyes.mask.astype(np.float32),
        "eyes_xy": np.array([avatar.eyes.x, avatar.eyes.y], np.int32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if len(data) > MAX_AVATAR_BYTES:
        raise ProtocolError(
            f"avatar {avatar.name!r} is {len(data) >> 20} MiB; the server "
            f"takes at most {MAX_AVATAR_BYTES >> 20} MiB"
        )
    return avatar_hash(arrays), data


def avatar_hash(arrays: dict[str, np.ndarray]) -> str:
    """A hash over every array's checksum (npz bytes carry timestamps: not hashed)."""
    return sha256_array(
        np.frombuffer(
            "".join(f"{k}={sha256_array(arrays[k])};" for k in sorted(arrays)).encode(), np.uint8
        )
    )


def avatar_from_blob(data: bytes, expected: str) -> Avatar:
    """Decode and check an uploaded avatar; ProtocolError if it is damaged or not as hashed."""
    if len(data) > MAX_AVATAR_BYTES:
        raise ProtocolError(f"avatar of {len(data)} bytes is over the limit")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if set(npz.files) != AVATAR_KEYS:
                raise ProtocolError(f"avatar arrays must be {sorted(AVATAR_KEYS)}")
            arrays = {k: npz[k] for k in npz.files}
    except ProtocolError:
        raise
    except Exception as exc:  # zip, header or dtype errors: all mean a damaged upload
        raise ProtocolError(f"avatar upload is not a valid npz: {exc}") from None
    if avatar_hash(arrays) != expected:
        raise ProtocolError("avatar upload does not match its sha256")
    # named by content: musetalk caches an avatar's latents under its name
    return _checked_avatar(arrays, f"remote-{expected[:16]}")


def _checked_avatar(a: dict[str, np.ndarray], name: str) -> Avatar:
    image = a["image"]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ProtocolError("avatar image must be uint8 (H, W, 3)")
    h, w = image.shape[:2]
    if not (0 < h <= MAX_HEIGHT and 0 < w <= MAX_WIDTH):
        raise ProtocolError(f"avatar image {w}x{h} is over {MAX_WIDTH}x{MAX_HEIGHT}")
    if a["landmarks"].shape != (68, 2):
        raise ProtocolError("avatar landmarks must be (68, 2)")

    def bank(key: str) -> PatchBank:
        patches, mask, xy = a[f"{key}_patches"], a[f"{key}_mask"], a[f"{key}_xy"]
        if patches.dtype != np.uint8 or patches.ndim != 5 or patches.shape[4] != 3:
            raise ProtocolError(f"{key} patches must be uint8 (A, B, h, w, 3)")
        ph, pw = patches.shape[2:4]
        if mask.shape != (ph, pw, 1) or xy.shape != (2,):
            raise ProtocolError(f"{key} mask or position has the wrong shape")
        x, y = (int(v) for v in xy)
        if not (0 <= x <= w - pw and 0 <= y <= h - ph):
            raise ProtocolError(f"{key} patches lie outside the image")
        return PatchBank(x, y, patches, mask.astype(np.float32))

    return Avatar(name, image, a["landmarks"].astype(np.float32), bank("mouth"), bank("eyes"))


# -- faces ----------------------------------------------------------------------------------------
Patch = tuple[int, int, np.ndarray]  # (x, y, uint8 (h, w, 3)) pasted into the avatar's base


HOST_FILES = ("/etc/machine-id", "/proc/sys/kernel/random/boot_id")


def host_id() -> str:
    """This machine as a hello's "host" (compared by the server): a digest of the systemd
    machine id and the kernel's boot id, the same for every process here (a cloned VM keeps
    the machine id, not the boot id); "" where neither can be read."""
    parts = []
    for source in HOST_FILES:
        try:
            parts.append(Path(source).read_text().strip())
        except OSError:
            parts.append("")
    if not any(parts):
        return ""  # unknown: never the server's
    return hashlib.sha256("livecam host\n".join(parts).encode()).hexdigest()[:32]


def resolve_encoding(asked: str, client_host: object, server_host: str) -> str:
    """The faces' encoding for a hello's `asked` (raw, jpeg or auto) and host."""
    if asked != AUTO:
        return asked
    same = isinstance(client_host, str) and bool(server_host) and client_host == server_host
    return "raw" if same else "jpeg"


def encode_patch(patch: np.ndarray, encoding: str) -> bytes:
    if encoding == "jpeg":
        ok, data = cv2.imencode(".jpg", patch, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ProtocolError("JPEG encoding failed")
        return data.tobytes()
    return np.ascontiguousarray(patch).tobytes()


def decode_patch(data: bytes, w: int, h: int, encoding: str) -> np.ndarray:
    if encoding == "jpeg":
        patch = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    elif len(data) == w * h * 3:
        patch = np.frombuffer(data, np.uint8).reshape(h, w, 3)
    else:
        patch = None
    if patch is None or patch.shape != (h, w, 3):
        raise ProtocolError(f"a {w}x{h} face patch does not decode")
    return patch
