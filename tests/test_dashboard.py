from rich.console import Console

from livecam import dashboard
from livecam.pipeline.stats import Snapshot


def _snapshot(**kw) -> Snapshot:
    base = dict(
        avatar="astronaut",
        engine="lite",
        tier="full",
        stride=2,
        batch=4,
        sink="virtual camera /dev/video10",
        source="pulse",
        target_fps=30,
        shown_fps=29.9,
        generated_fps=30.1,
        frames_shown=900,
        frames_new=850,
        frames_held=30,
        frames_repeated=20,
        frames_generated=880,
        frames_skipped=3,
        frames_late=4,
        frames_silent=0,
        queue_depth=2,
        queue_capacity=8,
        queue_drops=0,
        late_ticks=0,
        audio_overruns=1,
        level_db=-18.0,
        latency_ms=112.0,
        playout_delay_ms=95.0,
        stages_ms={"generate": (0.8, 1.2), "compose": (1.9, 2.4), "latency": (97.2, 104.6)},
        uptime_s=75,
    )
    return Snapshot(**{**base, **kw})


def _text(snapshot: Snapshot) -> str:
    console = Console(record=True, width=110, color_system=None)
    console.print(dashboard.render(snapshot))
    return console.export_text()


def test_dashboard_shows_the_numbers_users_need():
    text = _text(_snapshot())
    for expected in (
        "astronaut",
        "lite",
        "/dev/video10",
        "pulse",
        "29.9 shown",
        "30 target",
        "30.1 generated",
        "5.6%",
        "30 held by stride",
        "20 late",
        "every 2. frame",
        "batch 4",
        "97/105 ms p50/p95",
        "112 ms",
        "2/8 frames",
        "generate",
        "1.20",
        "compose",
        "2.40",
        "-18.0 dBFS",
        "up 1:15",
        "1 audio overruns",
        "880 generated (4 after their tick)",
    ):
        assert expected in text, expected


def test_dashboard_shows_the_measured_and_the_requested_capture_latency():
    mic = _snapshot(
        capture_ms=4.3, capture_basis="timestamps", capture_requested_ms=10, capture_granted_ms=20
    )
    text = _text(mic)
    assert "4 ms measured (timestamps); asked 10 ms, device reports 20 ms" in text
    assert "capture" not in _text(_snapshot())  # a file source has no input latency
    waiting = _snapshot(capture_basis="reported", capture_requested_ms=10, capture_granted_ms=0)
    assert "capture" not in _text(waiting)  # no microphone opened yet: nothing measured


def test_dashboard_shows_warnings_and_meter_extremes():
    text = _text(_snapshot(warnings=("microphone 'USB' delivers no audio",), level_db=-120))
    assert "⚠ microphone 'USB' delivers no audio" in text
    assert "-99.0 dBFS" in text and "█" not in text
    loud = _text(_snapshot(level_db=0.0))
    assert loud.count("█") == dashboard.METER_WIDTH


def test_dashboard_shows_the_remote_server_only_when_there_is_one():
    assert "server" not in _text(_snapshot())
    line = "ws://gpu:8765/v1/stream · rtt 9/14 ms p50/p95 · remote queue 2"
    assert "rtt 9/14 ms p50/p95 · remote queue 2" in _text(_snapshot(remote=line))


def test_dashboard_shows_device_names_as_they_are_not_as_markup():
    # a microphone, camera or server name with brackets: never taken for (or failing as) markup
    names = dict(source="USB Mic [bold] [/dev/snd]", sink="file [rec]/call.mp4",
                 remote="ws://[::1]:8765/v1/stream", avatar="me")  # fmt: skip
    text = _text(_snapshot(**names))
    for name in names.values():
        assert name in text, name
