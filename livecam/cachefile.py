"""Cache files: written whole or not at all, and arrays read back only when their checksums match.

Both caches use it: the avatar cache (a manifest and arrays.npz per version folder) and the
musetalk latents kept beside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from livecam.hashing import sha256_array


def checksums(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    return {key: sha256_array(value) for key, value in arrays.items()}


def replace_file(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a fresh temporary in the same folder, then rename it over `path`: a
    reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Save to an .npz file; returns the checksums to keep in the manifest."""
    replace_file(path, lambda fh: np.savez(fh, **arrays))
    return checksums(arrays)


def load_arrays(path: Path, expected: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or ValueError saying how it differs from `expected`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # zip, zlib, header or I/O errors all mean "damaged"
        raise ValueError(f"unreadable {path.name}: {exc}") from exc
    if set(arrays) != set(expected):
        raise ValueError("array set differs from the manifest")
    for key, value in arrays.items():
        if sha256_array(value) != expected[key]:
            raise ValueError(f"checksum mismatch in {key}")
    return arrays
