"""The mutation run's memo (tools/mutation_memo.py): a mutant whose arguments differ in any
way must run the real function, or the run would count a changed result as unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tools.mutation_memo import Unhashable, fingerprint, memoized


@dataclass(frozen=True)
class Params:
    size: int
    scale: float


def test_any_difference_in_the_arguments_is_another_key() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    one_pixel = image.copy()
    one_pixel[2, 3] += 1
    base = fingerprint(image, Params(4, 1.0), {"max_y": 3})
    others = [
        fingerprint(one_pixel, Params(4, 1.0), {"max_y": 3}),
        fingerprint(image.astype(np.int8), Params(4, 1.0), {"max_y": 3}),
        fingerprint(image.reshape(4, 3), Params(4, 1.0), {"max_y": 3}),
        fingerprint(image, Params(4, 1.5), {"max_y": 3}),
        fingerprint(image, Params(4, 1.0), {"max_y": 4}),
        fingerprint(image, Params(4, 1.0), {"max_x": 3}),
        fingerprint(image, Params(4, 1.0), {"max_y": 3.0}),  # same ==, other type
        fingerprint(image, (4, 1.0), {"max_y": 3}),
        fingerprint(image, Params(4, 1.0), None),
    ]
    assert len({base, *others}) == len(others) + 1
    again = fingerprint(image.copy(), Params(4, 1.0), {"max_y": 3})
    assert again == base
    assert fingerprint(Path("a.png")) == fingerprint(Path("a.png")) != fingerprint("a.png")


def test_a_call_runs_once_per_arguments_and_hands_out_copies() -> None:
    calls = []

    def build(image: np.ndarray, *, gain: int = 1) -> dict[str, np.ndarray]:
        calls.append(gain)
        return {"out": image * gain}

    cached = memoized("test:build", build)
    image = np.ones(3, np.int64)
    first = cached(image, gain=2)
    first["out"][0] = 99  # a caller changing its result changes nobody else's
    assert np.array_equal(cached(image, gain=2)["out"], [2, 2, 2])
    assert np.array_equal(cached(image, gain=3)["out"], [3, 3, 3])
    assert calls == [2, 3]


def test_arguments_it_cannot_fingerprint_run_the_function_every_time() -> None:
    calls = []
    cached = memoized("test:f", lambda value: calls.append(value) or len(calls))
    handle = object()
    assert (cached(handle), cached(handle)) == (1, 2)
    with pytest.raises(Unhashable, match="object"):
        fingerprint(handle)
