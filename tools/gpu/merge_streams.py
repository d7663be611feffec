"""Merges the `livecam bench --remote --json` reports of one run's client processes, or
(--summary) sums up the runs: how many 25-fps streams the pool held (tools/gpu/serve.sh).

A stream is held when it ended at the full tier with every frame made (stride 1) and made at
least 90 % of the frame rate over the run (its start, connection and first calls included).
"""

from __future__ import annotations

import collections
import contextlib
import json
import sys
from pathlib import Path

HELD_SHARE = 0.9


def held(row: dict, fps: float) -> bool:
    mode = row["mode"]
    return (
        mode["tier"] == "full" and mode["stride"] == 1 and row["generated_fps"] >= HELD_SHARE * fps
    )


def merge(streams: int, reports: list[dict], failed: int) -> dict:
    """One run's client reports; `failed`: clients that gave no report (see their logs)."""
    if not reports:
        return {"streams": streams, "failed_clients": failed, "held": 0}
    rows = [row for report in reports for row in report["per_stream"]]
    fps = reports[0]["target_fps"]
    batches: collections.Counter[str] = collections.Counter()
    for report in reports:
        batches.update(report["server_batch_streams"])
    return {
        "streams": streams,
        "clients": len(reports),
        "failed_clients": failed,
        "target_fps": fps,
        "held": sum(held(row, fps) for row in rows),
        "generated_fps_total": round(sum(row["generated_fps"] for row in rows), 1),
        "shown_fps_min": min(row["shown_fps"] for row in rows),
        "latency_p95_ms_max": max(row["latency_ms"]["p95"] for row in rows),
        "rtt_p50_ms_max": max(row["rtt_ms"]["p50"] or 0.0 for row in rows),
        "timeouts": sum(row["timeouts"] for row in rows),
        "late_replies": sum(row["late_replies"] for row in rows),
        "modes": collections.Counter(
            f"{row['mode']['tier']}/{row['mode']['stride']}" for row in rows
        ),
        "server_batch_streams": dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
        "per_stream": rows,
    }


def summary(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda run: run["streams"])
    brief = [{k: v for k, v in run.items() if k != "per_stream"} for run in runs]
    all_held = [run["streams"] for run in runs if run["held"] == run["streams"]]
    return {"streams_held": max(all_held, default=0), "runs": brief}


def main(args: list[str]) -> None:
    if args[0] == "--summary":
        runs = [json.loads(Path(name).read_text()) for name in args[1:]]
        print(json.dumps(summary(runs), indent=1))
        return
    reports = []
    for name in args[1:]:
        with contextlib.suppress(OSError, ValueError):  # a client that failed: none
            reports.append(json.loads(Path(name).read_text()))
    print(json.dumps(merge(int(args[0]), reports, len(args) - 1 - len(reports)), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
