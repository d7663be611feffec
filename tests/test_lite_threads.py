"""The lite engine is called from two threads at once: the generator thread's `generate` and the
output thread's `generate_silent` (the idle face shown before the first generated frame)."""

import threading

import numpy as np

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.engines.lite import LiteEngine
from tests.conftest import SPEECH

FPS = 30
FRAMES = range(40, 100)


def test_concurrent_generate_and_silent_faces_are_each_whole():
    avatar = load_avatar("astronaut")
    audio = read_audio(SPEECH)
    ring = AudioRing(len(audio))
    ring.write(audio)
    reference = LiteEngine(avatar, FPS)
    spoken = reference.generate(ring, list(FRAMES))
    silent = reference.generate_silent(list(FRAMES))
    assert any(not np.array_equal(a, b) for a, b in zip(spoken, silent, strict=True))

    engine = LiteEngine(avatar, FPS)
    engine.generate(ring, list(FRAMES))  # the same hops analysed, as in the reference
    wrong: list[str] = []

    def speak() -> None:
        for _ in range(8):
            for k, want in zip(FRAMES, spoken, strict=True):
                if not np.array_equal(engine.generate(ring, [k])[0], want):
                    wrong.append(f"spoken frame {k}")

    def idle() -> None:
        for _ in range(8):
            for k, want in zip(FRAMES, silent, strict=True):
                if not np.array_equal(engine.generate_silent([k])[0], want):
                    wrong.append(f"silent frame {k}")

    threads = [threading.Thread(target=speak), threading.Thread(target=idle)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} faces mixed two renders, e.g. {wrong[:3]}"
