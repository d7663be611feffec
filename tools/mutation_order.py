"""pytest plugin for mutation runs (tools/mutation.py): a mutant's tests run fastest first,
by the durations mutmut measured in its clean run, so the first test that kills the mutant ends
its run soonest (mutmut hands them over in no particular order)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from mutmut.__main__ import state  # the forked run's copy of the parent's measurements

    durations = state().duration_by_test
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
