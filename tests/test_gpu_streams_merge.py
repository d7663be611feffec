"""tools/gpu/merge_streams.py: the GPU pool run's figure, how many 25-fps streams it held."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "gpu" / "merge_streams.py"


def _row(tier: str = "full", stride: int = 1, generated: float = 24.0) -> dict:
    return {
        "mode": {"tier": tier, "stride": stride, "batch": 1},
        "generated_fps": generated,
        "shown_fps": 25.0,
        "latency_ms": {"p50": 90.0, "p95": 110.0},
        "rtt_ms": {"p50": 30.0, "p95": 40.0},
        "timeouts": 1,
        "late_replies": 2,
    }


def _report(rows: list[dict], batches: dict[str, int]) -> dict:
    return {"target_fps": 25.0, "per_stream": rows, "server_batch_streams": batches}


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_run_merges_its_clients_and_counts_the_streams_held(tmp_path):
    a, b, broken = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_report([_row(), _row(generated=22.4)], {"1": 3, "2": 5})))
    b.write_text(json.dumps(_report([_row("tiny"), _row(stride=2), _row()], {"2": 1, "10": 4})))
    broken.write_text("")  # a client that died before its report
    run = _run("5", str(a), str(b), str(broken))
    assert (run["streams"], run["clients"], run["failed_clients"]) == (5, 2, 1)
    # held: full tier, every frame, 90 % of 25 fps made (22.4 is under 22.5)
    assert run["held"] == 2
    assert run["modes"] == {"full/1": 3, "tiny/1": 1, "full/2": 1}
    assert run["server_batch_streams"] == {"1": 3, "2": 6, "10": 4}
    assert (run["timeouts"], run["late_replies"]) == (5, 10)
    assert run["generated_fps_total"] == 118.4 and len(run["per_stream"]) == 5


def test_the_summary_is_the_most_streams_all_held(tmp_path):
    runs = {4: 4, 8: 8, 12: 11, 16: 9}
    names = []
    for streams, held in runs.items():
        rows = [_row() for _ in range(held)] + [_row(stride=2)] * (streams - held)
        path = tmp_path / f"run-{streams}.json"
        names.append(str(path))
        report = tmp_path / f"client-{streams}.json"
        report.write_text(json.dumps(_report(rows, {"1": 1})))
        path.write_text(json.dumps(_run(str(streams), str(report))))
    summary = _run("--summary", *sorted(names))  # lexical order: 12 before 4
    assert summary["streams_held"] == 8
    assert [run["streams"] for run in summary["runs"]] == [4, 8, 12, 16]
    assert all("per_stream" not in run for run in summary["runs"])
