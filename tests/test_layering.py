"""The layering of the package, stated once and checked: stages import only what lies below.

The data flow is audio -> features -> engines -> pipeline -> sinks; avatars feed the engines and
the compositor. The app around them (cli, live, control, session, dashboard, doctor, bench,
service) may import any stage. Imports inside functions count too.

`python -m tests.test_layering` prints which package imports which.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "livecam"
SHARED = {
    "livecam.constants",
    "livecam.limits",
    "livecam.hashing",
    "livecam.paths",
    "livecam.cachefile",
}

# stage -> the stages it may import (besides itself and SHARED)
ALLOWED = {
    "livecam.audio": set(),
    "livecam.features": {"livecam.audio"},
    "livecam.avatar": set(),
    "livecam.engines": {"livecam.audio", "livecam.features", "livecam.avatar"},
    "livecam.pipeline": {
        "livecam.audio",
        "livecam.avatar",
        "livecam.engines.base",
        "livecam.sinks.base",
    },
    "livecam.sinks": set(),
}
ENGINES = ("livecam.engines.lite", "livecam.engines.musetalk", "livecam.engines.simulated")


def module_imports() -> dict[str, set[str]]:
    """Every livecam module and the livecam modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                # `from livecam.x import y`: y may be a module of package x
                targets |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t.startswith("livecam")}
    modules = set(graph)
    # every import runs livecam/__init__ (a docstring): not an edge
    return {
        m: {t for t in ts if t in modules and t not in (m, "livecam")} for m, ts in graph.items()
    }


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _stage(module: str) -> str | None:
    return next((s for s in ALLOWED if _within(module, s)), None)


def test_stages_import_only_the_stages_below():
    wrong = []
    for module, targets in module_imports().items():
        stage = _stage(module)
        if stage is None:
            continue  # the app
        allowed = {stage, *ALLOWED[stage], *SHARED}
        for target in targets:
            if not any(_within(target, a) for a in allowed):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_engines_never_import_each_other():
    wrong = [
        f"{module} imports {target}"
        for module, targets in module_imports().items()
        for target in targets
        for mine in ENGINES
        if _within(module, mine)
        for other in ENGINES
        if other != mine and _within(target, other)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = module_imports()
    # a package's __init__ importing its own modules is how packages are built, not a cycle
    edges = {m: {t for t in ts if not _within(t, m)} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def package_graph() -> dict[str, set[str]]:
    def group(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in module_imports().items():
        out[group(module)] |= {group(t) for t in targets if group(t) != group(module)}
    return out


if __name__ == "__main__":
    for package, targets in sorted(package_graph().items()):
        print(f"{package}: {', '.join(sorted(targets)) or '-'}")
