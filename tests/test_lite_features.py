import numpy as np

from livecam.audio.files import read_audio
from livecam.constants import HOPS_PER_SECOND, SAMPLE_RATE
from livecam.features.lite import LiteFeatures
from tests.conftest import JFK, SPEECH


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_chunking_does_not_change_the_features():
    audio = read_audio(JFK)[: 3 * SAMPLE_RATE]
    whole = LiteFeatures().push(audio)
    streamed = LiteFeatures()
    parts = [streamed.push(audio[i : i + 123]) for i in range(0, len(audio), 123)]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)


def test_silence_and_noise_floor_keep_the_mouth_closed():
    rng = np.random.default_rng(0)
    noise = (0.003 * rng.standard_normal(5 * SAMPLE_RATE)).astype(np.float32)
    hops = LiteFeatures().push(noise)
    assert np.all(hops[:, 0] == 0) and np.all(hops[:, 2] == 0)


def test_speech_opens_the_mouth_and_silence_closes_it():
    hops = LiteFeatures().push(read_audio(SPEECH))
    opens = hops[:, 0]
    lead, tail = int(0.4 * HOPS_PER_SECOND), int(0.8 * HOPS_PER_SECOND)
    assert np.all(opens[:lead] == 0)  # 0.5 s of silence before the speech
    assert np.all(opens[-tail:] == 0)  # and 1 s after it
    speech = opens[lead:-tail]
    assert speech.max() > 0.6
    # syllables: the mouth opens and closes many times, not once
    crossings = np.count_nonzero(np.diff((speech > 0.3).astype(int)) == 1)
    assert crossings > 15


def test_fast_attack_slow_release():
    burst = np.concatenate([_tone(300, 0.5, 0.001), _tone(300, 0.3), _tone(300, 0.5, 0.001)])
    opens = LiteFeatures().push(burst)[:, 0]
    onset, offset = int(0.5 * HOPS_PER_SECOND), int(0.8 * HOPS_PER_SECOND)
    peak = opens[onset:offset].max()
    rise = np.argmax(opens[onset:] > 0.9 * peak)
    fall = np.argmax(opens[offset:] < 0.1 * peak)
    assert 0 < rise < fall


def test_front_vowel_is_wider_than_back_vowel():
    def vowel(f1: float, f2: float) -> np.ndarray:
        voiced = _tone(f1, 1.0, 0.2) + _tone(f2, 1.0, 0.1) + _tone(150, 1.0, 0.1)
        return np.concatenate([_tone(150, 0.3, 0.001), voiced])

    ee = LiteFeatures().push(vowel(300, 2300))[-10:, 1].mean()
    oo = LiteFeatures().push(vowel(300, 800))[-10:, 1].mean()
    assert ee > 0.3 and oo < -0.3
