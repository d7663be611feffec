"""Shared time and size constants; each derived value shows where it comes from."""


def exact_div(x: int, y: int) -> int:
    assert x % y == 0, f"{x} is not a multiple of {y}"
    return x // y


SAMPLE_RATE = 16_000  # Hz, mono float32 everywhere inside livecam
HOP_MS = 20  # lite feature step
HOP_LENGTH = exact_div(SAMPLE_RATE * HOP_MS, 1000)  # 320 samples per feature step
HOPS_PER_SECOND = exact_div(SAMPLE_RATE, HOP_LENGTH)  # 50
# audio blocks in and out (microphone, virtual microphone, latency probes): each one a
# capture block adds its length to the latency
BLOCK = exact_div(HOP_LENGTH, 2)  # 160 samples, 10 ms

DEFAULT_FPS = 30
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1280, 720
DEFAULT_AVATAR = "astronaut"
