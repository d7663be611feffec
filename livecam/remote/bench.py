"""`livecam bench --streams N [--remote URL]`: N live pipelines at once (a looped speech clip
paced like a microphone, memory sinks), local or on a `livecam serve` pool: shown fps and
mic-to-frame latency per stream, aggregate generated fps, the server's batch sizes."""

from __future__ import annotations

import collections
import time
from dataclasses import replace
from pathlib import Path

from livecam.live import LiveOptions, build_pipeline, close_engine
from livecam.pipeline.runner import Pipeline

AVATARS = ("astronaut", "portrait")
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "jfk.wav"


def streams_report(opts: LiveOptions, streams: int, seconds: float) -> dict:
    pipelines: list[Pipeline] = []
    try:
        for i in range(streams):
            avatar = AVATARS[i % len(AVATARS)]
            pipelines.append(build_pipeline(replace(
                opts, avatar=avatar, sink="memory", audio_file=opts.audio_file or SAMPLE,
                loop=True, dashboard=False, remote_only=True,
            )))  # fmt: skip
        for pipeline in pipelines:
            pipeline.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.25)
            for pipeline in pipelines:
                pipeline.source.poll()
        elapsed = time.monotonic() - t0
        rows = [_stream_row(p, elapsed) for p in pipelines]
    finally:
        for pipeline in pipelines:
            pipeline.stop()
            close_engine(pipeline.engine)
    batches: collections.Counter[int] = collections.Counter()
    frames: collections.Counter[int] = collections.Counter()
    for pipeline in pipelines:
        link = getattr(pipeline.engine, "link", None)
        if link is not None:
            batches.update(link.stats.batch_streams)
            frames.update(link.stats.batch_frames)
    return {
        "remote": opts.remote,
        "streams": streams,
        "seconds": round(elapsed, 1),
        "target_fps": opts.fps,
        "size": f"{opts.width}x{opts.height}",
        "generated_fps_total": round(sum(r["generated_fps"] for r in rows), 1),
        "shown_fps_min": min(r["shown_fps"] for r in rows),
        "latency_p95_ms_max": max(r["latency_ms"]["p95"] for r in rows),
        # generator calls seen by the streams, by requests (streams) and frames merged
        "server_batch_streams": dict(sorted(batches.items())),
        "server_batch_frames": dict(sorted(frames.items())),
        "per_stream": rows,
    }


def _stream_row(pipeline: Pipeline, elapsed: float) -> dict:
    snap = pipeline.snapshot()
    p50, p95 = snap.stages_ms.get("latency", (0.0, 0.0))
    row = {
        "avatar": snap.avatar,
        "shown_fps": round(snap.frames_shown / elapsed, 2),
        "generated_fps": round(snap.frames_generated / elapsed, 2),
        "skip_ratio": round(snap.skip_ratio, 4),
        "frames_repeated_late": snap.frames_repeated,
        "frames_after_their_tick": snap.frames_late,  # remote replies a lost packet held up
        # shown frames: stream time at the tick minus the frame's own time (sink adds ~0)
        "latency_ms": {"p50": round(p50, 1), "p95": round(p95, 1)},
        "playout_delay_ms": round(snap.playout_delay_ms, 1),
        "mode": {"tier": snap.tier, "stride": snap.stride, "batch": snap.batch},
        "generate_ms_p95": round(snap.stages_ms.get("generate", (0.0, 0.0))[1], 2),
    }
    link = getattr(pipeline.engine, "link", None)
    if link is not None:
        rtt = sorted(link.stats.rtt_s)
        row["rtt_ms"] = {
            "p50": round(rtt[len(rtt) // 2] * 1e3, 1) if rtt else None,
            "p95": round(rtt[int(len(rtt) * 0.95)] * 1e3, 1) if rtt else None,
        }
        row["local_frames"] = link.stats.local_frames
        row["reconnects"] = link.stats.reconnects
        row["remote_frames"] = link.stats.remote_frames
        # requests not answered in time: by the client's wait, or the server's (queued)
        row["timeouts"], row["late_replies"] = link.stats.timeouts, link.stats.late
    return row
