"""MuseTalk v1.5: models manifest, safe weight loading, whisper features and the neural engine.

Its heavy dependencies (torch, transformers, diffusers) come with the `musetalk` extra; the
default install (the lite engine) has none of them, and nothing here imports them at load.
"""

from __future__ import annotations

import importlib.util

NEEDS = ("torch", "transformers", "diffusers", "safetensors", "huggingface_hub")
INSTALL = "pip install 'livecam[musetalk]'"


class ExtraMissing(RuntimeError):
    """The musetalk extra is not installed."""


def require_extra() -> None:
    """Raises ExtraMissing, naming the missing packages and the install command."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ExtraMissing(f"the musetalk engine needs {', '.join(missing)}: {INSTALL}")
