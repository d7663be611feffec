"""whisper features: offline vs an independent implementation of MuseTalk's definition,
streaming deviation, and the `livecam features` command (tiny random whisper)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.cli import app
from livecam.engines.musetalk.models import compute_features, whisper_from_dir
from livecam.features.whisper import (
    OfflineFeatures,
    StreamingFeatures,
    WhisperAudio,
    features_together,
    frame_steps,
    offline_features,
    offline_steps,
    pad_steps,
    streaming_deviation,
    streaming_features,
)
from tests.conftest import JFK
from tests.helpers import write_clip
from tests.musetalk_tiny import tiny_models_dir
from tests.whisper_reference import reference_features, rel_l2


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_models_dir()


def test_frame_window_matches_musetalk_at_25fps() -> None:
    assert frame_steps(0, 25) == (-4, 6)  # 80 ms before frame 0 to 80 ms after it ends
    assert frame_steps(10, 25) == (16, 26)


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_offline_matches_independent_reference(tiny: Path, fps: float) -> None:
    jfk = read_audio(JFK)
    audio = np.concatenate([jfk, jfk, jfk[: 16_000 * 10]]) if fps == 25 else jfk  # > 30 s
    ours = compute_features(tiny, audio, fps, streaming=False, device="cpu")
    ref = reference_features(tiny, audio, fps)
    assert ours.shape == ref.shape == (math.floor(len(audio) / 16_000 * fps), 50, 384)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - ref).max()) <= 1e-5


def _per_state(live: np.ndarray, offline: np.ndarray) -> list[float]:
    n = len(offline)
    return [rel_l2(a, b) for a, b in zip(*(f.reshape(n, 10, 5, 384).transpose(2, 0, 1, 3)
                                           for f in (live, offline)), strict=True)]  # fmt: skip


def test_streaming_stays_close_to_offline(tiny: Path) -> None:
    jfk = read_audio(JFK)
    audio = np.concatenate([jfk, jfk])  # 22 s: longer than the 8 s window, which must slide
    whisper = whisper_from_dir(tiny, "cpu")
    n = math.floor(len(audio) / 16_000 * 25)
    offline = offline_features(whisper, audio, 25, n).numpy()
    live = streaming_features(whisper, audio, 25, n, batch=8)
    assert live.shape == offline.shape
    # the padding steps before the clip are exact zeros in both
    assert np.array_equal(live[0, :20], offline[0, :20])
    # frame 0 is computed too: past its 4 padding steps it is the clip's first steps
    assert np.abs(live[0, 20:]).max() > 0
    # The embedding output (state 0) is the conv of the log-mel plus the position embedding:
    # once the stream has heard the clip's loudest sound (the first copy), its normalisation is
    # the offline one, so every step but the newest two (the STFT and convs reach past the
    # newest sample) must equal offline, up to float32 rounding: a window given the wrong
    # position cannot. (The last frames reach past the clip's end: offline pads zero steps.)
    inside = slice(n // 2, n - 3)
    steps, ref = (f.reshape(n, 10, 5, 384)[inside, :8, 0] for f in (live, offline))
    assert np.abs(steps - ref).max() < 1e-4
    # more past context brings the layers closer to offline than a 0.4 s window does
    short = streaming_features(whisper, audio, 25, n, batch=8, context_s=0.4)
    pairs = zip(_per_state(live, offline), _per_state(short, offline), strict=True)
    assert all(ours < cut for ours, cut in list(pairs)[1:])


def test_the_streaming_deviation_is_the_streams_distance_from_offline(tiny: Path) -> None:
    audio = read_audio(JFK)[: 4 * 16_000]
    whisper = whisper_from_dir(tiny, "cpu")
    report = streaming_deviation(whisper, audio, 25, batch=4, context_s=2.0)
    offline = offline_features(whisper, audio, 25).numpy()
    live = streaming_features(whisper, audio, 25, 100, batch=4, context_s=2.0)
    assert report == {"relative_l2": round(rel_l2(live, offline), 4),
                      "per_state_relative_l2": [round(x, 4) for x in _per_state(live, offline)],
                      "frames": 100, "batch": 4, "context_s": 2.0}  # fmt: skip
    assert 0 < report["relative_l2"] < 1


def test_features_cli_writes_npy(tiny: Path, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "two.wav", read_audio(JFK)[: 2 * 16_000])
    for streaming in (True, False):
        out = tmp_path / f"f-{streaming}.npy"
        args = ["features", str(clip), "--models-dir", str(tiny), "--out", str(out)]
        flag = "--streaming" if streaming else "--no-streaming"
        result = CliRunner().invoke(app, [*args, "--fps", "25", flag])
        assert result.exit_code == 0, result.output
        feats = np.load(out)
        assert feats.dtype == np.float32 and feats.shape == (50, 50, 384)
        audio = read_audio(clip)
        want = compute_features(tiny, audio, 25, streaming=streaming, device="cpu")
        assert np.array_equal(feats, want)  # what the command wrote is the chosen path's
    offline, live = np.load(tmp_path / "f-False.npy"), np.load(tmp_path / "f-True.npy")
    assert not np.array_equal(offline, live)


def _ring_until(audio: np.ndarray, end: int) -> AudioRing:
    ring = AudioRing(len(audio) + 16_000 * 30)
    ring.write(np.concatenate([audio, np.zeros(max(0, end - len(audio)), np.float32)])[:end])
    return ring


def test_streaming_windows_take_their_position_in_the_segment(tiny: Path) -> None:
    """With the convolutions zeroed, whisper's embedding output (hidden state 0) is a constant
    plus the positional embedding of the step: it depends on where a step sits in its 30 s
    segment and on nothing else. So streaming must match offline exactly there, also for
    steps whose 8 s window starts well after the segment start (audio longer than a window)."""
    whisper = whisper_from_dir(tiny, "cpu")
    with torch.no_grad():
        whisper.encoder.conv1.weight.zero_()
        whisper.encoder.conv2.weight.zero_()
    audio = read_audio(JFK)  # 11 s: longer than the 8 s window
    fps, frames = 25.0, list(range(240, 250))  # 9.6 s .. 10 s
    stream = StreamingFeatures(whisper, fps)
    assert stream.window * 320 < 240 / fps * 16_000  # the window no longer starts at 0
    got = stream.features(_ring_until(audio, stream.samples_needed(frames[-1])), frames)
    want = offline_features(whisper, audio, fps)[frames[0] : frames[-1] + 1]
    state0 = (slice(None), slice(None), 0)
    got, want = got.reshape(len(frames), 10, 5, -1), want.reshape(len(frames), 10, 5, -1)
    assert float(torch.abs(want[state0]).max()) > 0.1  # the positions are not all zero
    assert torch.allclose(got[state0], want[state0], atol=1e-5)


@pytest.mark.parametrize("first", [250, 100])
def test_streaming_features_see_seconds_of_left_context(tiny: Path, first: int) -> None:
    """Every streamed step is encoded with at least half the window (4 s of the default 8 s)
    of audio before it: changing the audio 3 s before a frame must change that frame's
    features (attention mixes the whole window); with a short context it could not. Frames
    4 s .. 10 s asked at once (catching up) must keep that context for the first of them."""
    whisper = whisper_from_dir(tiny, "cpu")
    audio = read_audio(JFK)
    fps, frames = 25.0, list(range(first, 251))
    changed = audio.copy()
    a = round((first / fps - 3.0) * 16_000)
    changed[a : a + 8_000] = 0.0  # silence half a second of speech, 3 s before the frame
    out = []
    for clip in (audio, changed):
        stream = StreamingFeatures(whisper, fps)
        ring = _ring_until(clip, stream.samples_needed(frames[-1]))
        out.append(stream.features(ring, frames)[0].numpy())
    assert np.abs(changed - audio)[a : a + 8_000].max() > 0.1  # it was speech
    layers = out[0].reshape(10, 5, -1)[:, 1:], out[1].reshape(10, 5, -1)[:, 1:]
    assert not np.allclose(*layers, atol=1e-4)


def test_musetalk_padding_around_the_steps() -> None:
    """2 frame spans of zero steps before the audio and 6 after (MuseTalk v1.5)."""
    assert pad_steps(25.0) == (4, 12)  # a frame spans 2 steps at 25 fps
    assert pad_steps(30.0) == (4, 12)  # 1.67 steps: rounded up
    assert pad_steps(50.0) == (2, 6)
    assert frame_steps(1, 30.0) == (-3, 7)  # floor(50 / 30) - 4


def _positions_only(tiny: Path):
    """whisper with its convolutions zeroed: hidden state 0 is a constant plus the step's
    positional embedding (see the test above)."""
    whisper = whisper_from_dir(tiny, "cpu")
    with torch.no_grad():
        whisper.encoder.conv1.weight.zero_()
        whisper.encoder.conv2.weight.zero_()
    return whisper


def _state0(features: torch.Tensor) -> torch.Tensor:
    return features.reshape(len(features), 10, 5, -1)[:, :, 0]


def test_streaming_restarts_the_positions_at_the_30_s_segment_edge(tiny: Path) -> None:
    """Offline cuts the audio into 30 s segments; a frame just after 30 s takes steps of both
    segments, and streaming must give each step its place in its own segment."""
    whisper = _positions_only(tiny)
    audio = np.tile(read_audio(JFK), 3)[: 32 * 16_000]
    # 25 fps: six frames in one call, 29.92 s .. 30.16 s; 30 fps: a frame a call, and frame
    # 897's steps end at 1501, one past the edge (a window of the second segment's first step);
    # and the first frames, where step 0 is the first computed: at 50/9 fps frame 0 is all
    # padding and frame 1's steps end at step 1
    cases = ((25.0, range(748, 754), 6), (30.0, range(894, 900), 1), (25.0, range(6), 1),
             (50 / 9, range(3), 1))  # fmt: skip
    for fps, frames, per_call in cases:
        stream = StreamingFeatures(whisper, fps)
        ring = _ring_until(audio, stream.samples_needed(frames[-1]))
        calls = [list(frames[i : i + per_call]) for i in range(0, len(frames), per_call)]
        got = torch.cat([stream.features(ring, call) for call in calls])
        want = offline_features(whisper, audio, fps)[frames[0] : frames[-1] + 1]
        assert torch.allclose(_state0(got), _state0(want), atol=1e-5), fps


def test_asking_again_for_earlier_frames_recomputes_them(tiny: Path) -> None:
    """A stream asked for earlier frames than its last (a restarted source) gives what a new
    stream gives for them, not steps cached for other times."""
    whisper = whisper_from_dir(tiny, "cpu")
    audio = read_audio(JFK)
    fps = 25.0
    ring = _ring_until(audio, len(audio))
    stream = StreamingFeatures(whisper, fps)
    stream.features(ring, list(range(200, 210)))
    again = stream.features(ring, list(range(20, 30)))
    fresh = StreamingFeatures(whisper, fps).features(ring, list(range(20, 30)))
    assert torch.equal(again, fresh)


def test_offline_features_from_the_ring_follow_its_audio(tiny: Path) -> None:
    """The render path: features of everything in the ring, MuseTalk's offline definition,
    computed again once more audio came in."""
    whisper = whisper_from_dir(tiny, "cpu")
    audio = read_audio(JFK)[: 3 * 16_000]
    fps = 25.0
    source = OfflineFeatures(whisper, fps)
    assert source.samples_needed(10) == frame_steps(10, fps)[1] * 320
    ring = AudioRing(len(audio))
    ring.write(audio[:32_000])
    first = source.features(ring, [5, 6])
    assert torch.equal(first, offline_features(whisper, audio[:32_000], fps)[5:7])
    ring.write(audio[32_000:])  # grew: the last second changes the 30 s segment's encoding
    again = source.features(ring, [5, 6])
    assert torch.equal(again, offline_features(whisper, audio, fps)[5:7])
    assert not torch.equal(again, first)


def test_offline_features_encode_once_per_length_of_the_ring(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livecam.features import whisper as module

    encodes: list[int] = []
    real = module.offline_steps
    monkeypatch.setattr(module, "offline_steps", lambda w, a: encodes.append(len(a)) or real(w, a))
    source = OfflineFeatures(whisper_from_dir(tiny, "cpu"), 25.0)
    ring = AudioRing(48_000)
    ring.write(read_audio(JFK)[:32_000])
    for frames in ([0, 1], [2, 3], [4]):  # a render asks batch after batch
        source.features(ring, frames)
    ring.write(np.zeros(1_000, np.float32))
    source.features(ring, [5])
    assert encodes == [32_000, 33_000]


def _no_whisper() -> Any:
    """What StreamingFeatures' constructor reads of a whisper: its width and device."""
    return SimpleNamespace(dim=4, device=torch.device("cpu"))


def test_the_stream_keeps_8_s_of_context_and_20_s_of_steps_by_default() -> None:
    stream = StreamingFeatures(_no_whisper(), 25)
    assert (stream.window, stream.min_left, stream.capacity) == (400, 200, 1000)  # steps
    assert stream.samples_needed(10) == 26 * 320  # frame 10's steps end at 26: no look-ahead
    ahead = StreamingFeatures(_no_whisper(), 25, lookahead_s=0.16)
    assert ahead.samples_needed(10) == (26 + 8) * 320
    # never less than two frames' steps; at most whisper's 30 s, all of it kept
    assert StreamingFeatures(_no_whisper(), 25, context_s=0.1).window == 20
    longest = StreamingFeatures(_no_whisper(), 25, context_s=30.0)
    assert (longest.window, longest.capacity) == (1500, 1500)
    with pytest.raises(ValueError) as err:
        StreamingFeatures(_no_whisper(), 25, context_s=30.02)
    assert str(err.value) == "the streaming window must fit in whisper's 30 s"


def test_the_log_mel_is_whispers_before_its_normalisation(tiny: Path) -> None:
    whisper = whisper_from_dir(tiny, "cpu")
    audio = read_audio(JFK)[: 3 * 16_000]
    length = 4 * 16_000  # a second of zero padding after the audio, as whisper pads
    log_mel = whisper.log_mel(audio.astype(np.float64), length)
    assert log_mel.dtype == torch.float32 and log_mel.shape == (80, length // 160)
    normalised = (torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0
    theirs = whisper.extractor(
        audio, sampling_rate=16_000, return_tensors="np", padding="max_length", max_length=length
    ).input_features[0]
    assert float(np.abs(normalised.numpy() - theirs).max()) < 1e-4


def test_an_encoder_in_double_precision_gets_its_input_in_its_dtype(tiny: Path) -> None:
    whisper = whisper_from_dir(tiny, "cpu")
    double = WhisperAudio(
        copy.deepcopy(whisper.encoder).double(), whisper.extractor, whisper.device
    )
    audio = read_audio(JFK)[: 2 * 16_000]
    log_mel = whisper.log_mel(audio, len(audio))
    peak = float(log_mel.max())
    ours, theirs = (w.steps_from_mel(log_mel, peak, 0) for w in (whisper, double))
    assert theirs.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-4)
    ours, theirs = (w.steps(audio) for w in (whisper, double))
    assert theirs.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-4)


def test_the_encoder_runs_once_a_call_and_not_for_steps_it_has(tiny: Path) -> None:
    whisper = whisper_from_dir(tiny, "cpu")
    ring = _ring_until(read_audio(JFK), 5 * 16_000)
    stream = StreamingFeatures(whisper, 25.0)
    for first in range(0, 50, 5):
        stream.features(ring, list(range(first, first + 5)))
    assert stream.encoder_runs == 10
    stream.features(ring, list(range(0, 50)))  # all cached, from step 0 to the newest
    assert stream.encoder_runs == 10


def test_a_look_ahead_computes_a_frame_as_the_frames_that_much_later_would(tiny: Path) -> None:
    whisper = whisper_from_dir(tiny, "cpu")
    ring = _ring_until(read_audio(JFK), 6 * 16_000)
    ahead = StreamingFeatures(whisper, 25.0, lookahead_s=0.16)  # 8 steps: 4 frames at 25 fps
    got = ahead.features(ring, [100])
    plain = StreamingFeatures(whisper, 25.0).features(ring, list(range(100, 105)))
    assert torch.equal(got[0], plain[0])
    assert not torch.equal(got[0], StreamingFeatures(whisper, 25.0).features(ring, [100])[0])


def test_the_loudness_peak_counts_only_mel_frames_centred_on_heard_audio(tiny: Path) -> None:
    """whisper clamps the log-mel at its maximum - 8. In a segment's first 8 s the stream's
    window is shorter than its log-mel, which whisper pads with silence: the mel frame centred
    on the newest sample is half that silence, which the future will fill, so it does not count
    (a click at the very end must not lower everything heard before it)."""
    whisper = whisper_from_dir(tiny, "cpu")
    for frame, segment_start in ((19, 0), (760, 30 * 16_000)):  # 0.76 s, 30.4 s
        stream = StreamingFeatures(whisper, 25.0)
        heard = np.zeros(stream.samples_needed(frame), np.float32)
        heard[-1] = 1.0  # a click at the newest sample, silence before it
        stream.features(_ring_until(heard, len(heard)), [frame])
        window = heard[segment_start:]
        with_the_centred_frame = float(whisper.log_mel(window, 8 * 16_000).max())
        assert math.log10(1e-10) < stream._peak_heard[1] < with_the_centred_frame, frame


def test_no_audio_gives_no_steps_and_no_frames(tiny: Path) -> None:
    whisper = whisper_from_dir(tiny, "cpu")
    assert offline_steps(whisper, np.zeros(0, np.float32)).shape == (0, 5, 384)
    assert offline_features(whisper, np.zeros(100, np.float32), 25).shape == (0, 50, 384)


def test_streaming_features_are_the_streams_a_batch_a_call(tiny: Path) -> None:
    """What the bench and `livecam features --streaming` report: each batch of frames asked for
    once, as soon as its audio has arrived."""
    whisper = whisper_from_dir(tiny, "cpu")
    audio = read_audio(JFK)[:16_000]
    got = streaming_features(whisper, audio, 25, 24, batch=4)
    stream = StreamingFeatures(whisper, 25)
    for first in range(0, 24, 4):
        frames = list(range(first, first + 4))
        ring = _ring_until(audio, stream.samples_needed(frames[-1]))  # what has arrived
        assert np.array_equal(got[first : first + 4], stream.features(ring, frames).numpy())


def test_streams_encoded_together_get_what_each_gets_alone(tiny: Path) -> None:
    """A pool's merged call encodes every stream's windows in one batch: each stream's
    features are what its own source gives, wherever it stands (its start, deep in a 30 s
    segment, across a segment edge: two windows, the second clamped by the first's peak),
    and the sources' caches and peaks end up the same."""
    whisper = whisper_from_dir(tiny, "cpu")
    jfk = read_audio(JFK)
    audio = np.concatenate([jfk] * 4)  # 44 s: past the first 30 s segment
    ring = AudioRing(len(audio))
    ring.write(audio)
    asks = [[0, 1, 2], [100, 101, 102, 103], [745, 746, 747, 748, 749, 750, 751, 752], [400]]
    alone, together = [], []
    for frames in asks:
        source = StreamingFeatures(whisper, 25.0)
        alone.append((source, source.features(ring, frames)))
    jobs = [(StreamingFeatures(whisper, 25.0), ring, frames) for frames in asks]
    together = features_together(jobs)
    assert [s.encoder_runs for s, _, _ in jobs] == [s.encoder_runs for s, _ in alone] == [
        1, 1, 2, 1
    ]  # fmt: skip
    for (source, mine), (joined, _, _), theirs in zip(alone, jobs, together, strict=True):
        assert theirs.shape == mine.shape
        assert torch.allclose(theirs, mine, atol=1e-5, rtol=1e-4)
        assert joined._peak_heard == source._peak_heard
        assert (joined._lo, joined._hi) == (source._lo, source._hi)
