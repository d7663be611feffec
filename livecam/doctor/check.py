"""One finding of `livecam doctor`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or the exact fix
    required: bool = True  # False: only some features need it
