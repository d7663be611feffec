"""pytest plugin for mutation runs (tools/mutation.py): deterministic functions from outside
the mutated module, named in the module's `memoized` list, answer from a memo filled by the
clean run, so each mutant does not redo the same expensive work (face detection and the lite
banks: 0.4 s an avatar build). A call with arguments the clean run never made (a mutant that
changed them) runs the real function. Each hit returns a deep copy, as a fresh call would.

Names are `module:attribute`, replaced where the mutated module looks them up; mutmut forks
each mutant from the process that ran the clean tests, so the memo is inherited."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import numpy as np

ENV = "LIVECAM_MUTATION_MEMOIZED"  # module:attribute names, comma-separated: tools/mutation.py
_memo: dict[bytes, Any] = {}
_installed: set[str] = set()


class Unhashable(TypeError):
    pass


def _feed(digest: Any, value: Any) -> None:
    """Feed `value`'s type and content to `digest`; Unhashable for types not listed here."""
    digest.update(type(value).__qualname__.encode() + b"\0")
    if isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _feed(digest, getattr(value, field.name))
    elif isinstance(value, list | tuple):
        digest.update(f"{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif value is None or isinstance(value, bool | int | float | str | bytes | PurePath):
        digest.update(repr(value).encode())
    else:
        raise Unhashable(type(value).__qualname__)
    digest.update(b"\1")


def fingerprint(*parts: Any) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        _feed(digest, part)
    return digest.digest()


def memoized(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            key = fingerprint(name, args, kwargs)
        except Unhashable:
            return function(*args, **kwargs)
        if key not in _memo:
            _memo[key] = function(*args, **kwargs)
        return copy.deepcopy(_memo[key])

    return call


def install(names: list[str]) -> None:
    for name in names:
        if name in _installed:
            continue  # mutmut runs several pytest sessions in one process
        module_name, _, attribute = name.partition(":")
        module = importlib.import_module(module_name)
        setattr(module, attribute, memoized(name, getattr(module, attribute)))
        _installed.add(name)


def pytest_configure() -> None:
    install([n for n in os.environ.get(ENV, "").split(",") if n])
