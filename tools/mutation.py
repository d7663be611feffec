"""Mutation run over livecam's core modules with mutmut; not part of CI.

    .venv/bin/python tools/mutation.py                # every module in pyproject.toml
    .venv/bin/python tools/mutation.py store latents  # some of them

Each module runs in .mutation/MODULE/, a copy of the sources with its own [tool.mutmut] (from
[tool.livecam.mutation] in pyproject.toml): its own tests, and its own results, which a rerun
keeps for the functions that did not change. `cd .mutation/MODULE && mutmut show NAME` prints a
mutant's diff. Prints mutants / killed / survived per module and each module's run time.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
COPIED = ("livecam", "tests", "avatars", "tools")
SPINNER = tuple("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏🎉")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for these plain paths and flags
    return repr(value)


def mutmut_config(common: dict, module: dict) -> str:
    """The [tool.mutmut] table of one module's run."""
    table = {
        **common,
        "only_mutate": [module["file"]],
        "pytest_add_cli_args_test_selection": module["tests"],
    }
    return "[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())


def prepare(name: str, common: dict, module: dict) -> Path:
    """.mutation/NAME with today's sources; mutants/ and its results stay."""
    where = WORK / name
    where.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in COPIED:
        shutil.rmtree(where / part, ignore_errors=True)
        shutil.copytree(ROOT / part, where / part, ignore=ignore)
    project = (ROOT / "pyproject.toml").read_text()
    (where / "pyproject.toml").write_text(project + "\n" + mutmut_config(common, module))
    return where


def run(where: Path, max_children: int | None, memoized: list[str]) -> None:
    # OMP_NUM_THREADS=1: mutmut forks each mutant's run from a process that already ran torch,
    # and a forked child's first multi-threaded torch op waits forever on the parent's OpenMP
    # team (a false "timeout")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["LIVECAM_MUTATION_MEMOIZED"] = ",".join(memoized)  # read by tools/mutation_memo.py
    env.pop("PYTHONPATH", None)  # the mutated copy in mutants/ must be the one imported
    # mutmut imported as mutmut.__main__ (not run as __main__ by -m): tools/mutation_order.py
    # reads the durations it measured from there
    command = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "run"]
    if max_children:  # more mutants at once than cores, for tests that mostly wait
        command += ["--max-children", str(max_children)]
    proc = subprocess.Popen(command, cwd=where, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    for raw in proc.stdout:  # survivors and the summary, not the spinner
        for line in raw.split("\r"):
            if line.strip() and not line.startswith(SPINNER):
                print(line.rstrip(), flush=True)
    if proc.wait():
        sys.exit(f"mutmut run failed in {where} (exit {proc.returncode})")


def counts(where: Path) -> collections.Counter:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                         cwd=where, capture_output=True, text=True, check=True).stdout  # fmt: skip
    return collections.Counter(
        line.rpartition(": ")[2] for line in out.splitlines() if ": " in line
    )


def main(names: list[str]) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["livecam"]["mutation"]
    modules = config["modules"]
    unknown = [n for n in names if n not in modules]
    if unknown:
        sys.exit(f"unknown module {', '.join(unknown)}; known: {' '.join(modules)}")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[mutation]"],
                       check=True)  # fmt: skip
    rows = []
    for name in names or list(modules):
        print(f"== {name} ({modules[name]['file']})", flush=True)
        where = prepare(name, config["mutmut"], modules[name])
        started = time.monotonic()
        run(where, modules[name].get("max_children"), config.get("memoized", []))
        rows.append((name, counts(where), time.monotonic() - started))
    print(f"\n{'module':10} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7} "
          f"{'other':>5} {'killed %':>8} {'minutes':>7}")  # fmt: skip
    for name, c, seconds in rows:
        n, k, s, t = c.total(), c["killed"], c["survived"], c["timeout"]
        print(f"{name:10} {n:7d} {k:7d} {s:8d} {t:7d} {n - k - s - t:5d} "
              f"{100 * k / max(n, 1):8.1f} {seconds / 60:7.1f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
