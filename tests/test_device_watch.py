"""DeviceWatch: the devices' polls on threads of their own, kept going through errors, and
none left running after the stop."""

import logging
import threading
import time

import pytest

from livecam.audio import device_watch
from livecam.audio.device_watch import DeviceWatch


def test_each_poll_runs_on_its_own_and_errors_are_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device_watch, "PERIOD_S", 0.01)
    hang, calls = threading.Event(), {"failing": 0, "fine": 0}

    def hanging() -> None:  # a device call waiting on a hung server
        hang.wait()

    def failing() -> None:
        calls["failing"] += 1
        raise RuntimeError("device gone")

    def fine() -> None:
        calls["fine"] += 1

    watch = DeviceWatch([hanging, failing, fine])
    watch.start()
    time.sleep(0.5)
    hang.set()
    watch.stop()
    assert calls["failing"] >= 10 and calls["fine"] >= 10  # the hang held up neither
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "watching an audio device failed (trying on): RuntimeError: device gone"
    ]
    after = dict(calls)
    time.sleep(0.1)
    assert calls == after  # stopped: none is called again


def test_stop_waits_for_a_poll_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_watch, "PERIOD_S", 0.01)
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:  # a reopen in progress: the stop must not race it
        started.set()
        time.sleep(0.3)
        finished.set()

    watch = DeviceWatch([slow])
    watch.start()
    assert started.wait(5)
    watch.stop()
    assert finished.is_set()
