import pytest

from livecam.audio.clock import AudioClock
from livecam.constants import SAMPLE_RATE


def test_origin_ignores_delivery_jitter():
    clock = AudioClock()
    for n, jitter in enumerate([0.0, 0.012, 0.003, 0.02, 0.001]):
        end = (n + 1) * 320
        clock.on_block(end, arrival=100.0 + end / SAMPLE_RATE + jitter)
    assert abs(clock.origin() - 100.0) < 1e-9
    assert abs(clock.stream_time(now=105.0) - 5.0) < 1e-9


def test_follows_sound_card_drift():
    clock = AudioClock(window=50)
    rate_error = 1.001  # the card runs 0.1 % slow relative to the system clock
    for n in range(2000):
        end = (n + 1) * 320
        clock.on_block(end, arrival=end / SAMPLE_RATE * rate_error)
    now = 2000 * 320 / SAMPLE_RATE * rate_error
    assert abs(clock.stream_time(now) - 2000 * 320 / SAMPLE_RATE) < 0.002


def test_seed_is_replaced_by_the_first_block():
    clock = AudioClock()
    clock.seed(50.0)
    assert clock.started and clock.origin() == 50.0
    clock.on_block(320, arrival=51.02)
    assert abs(clock.origin() - 51.0) < 1e-9


def test_defaults_to_the_monotonic_clock_and_says_when_it_has_no_audio():
    import time

    import pytest

    clock = AudioClock()
    with pytest.raises(RuntimeError, match=r"^no audio captured yet$"):
        clock.origin()
    assert not clock.started
    before = time.monotonic()
    clock.on_block(1600)  # 0.1 s of audio, arriving now
    after = time.monotonic()
    assert before - 0.1 <= clock.origin() <= after - 0.1
    assert 0.1 <= clock.stream_time() <= 0.1 + (time.monotonic() - before)


def test_an_early_block_is_forgotten_after_the_200_that_follow_it():
    """The default window: a block's offset counts for 200 blocks (2 s of 10 ms blocks), long
    enough to ride out delivery jitter, short enough to follow drift."""
    clock = AudioClock()
    clock.on_block(160, arrival=0.0)  # early: an offset of -0.01 s
    for n in range(2, 201):
        clock.on_block(160 * n, arrival=n * 0.01 + 0.005)  # each 5 ms late
    assert clock.stream_time(10.0) == pytest.approx(10.0 + 0.01)  # 200 blocks in: kept
    clock.on_block(160 * 201, arrival=2.01 + 0.005)
    assert clock.stream_time(10.0) == pytest.approx(10.0 - 0.005)  # the 201st pushed it out
