"""Streaming mouth-shape features for the lite engine: numpy only, causal, stateful.

Every 20 ms hop gives an openness (0 closed .. 1 wide open) and a width (-1 rounded .. +1
spread) from a 40 ms window centred on the hop: speech-band loudness relative to an adaptive
noise floor and the speaker's recent peak, voice-activity gated, smoothed with a fast attack
and a slower release. Width comes from where the second formant sits (front vowels push energy
above 1.8 kHz, rounded vowels keep it below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from livecam.constants import HOP_LENGTH, SAMPLE_RATE

WINDOW = 2 * HOP_LENGTH  # 40 ms analysis window centred on each hop
N_FFT = 1024
_FREQS = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
_HANN = np.hanning(WINDOW).astype(np.float32)
_HANN_POWER = float(np.sum(_HANN**2))


def _band(lo: float, hi: float) -> np.ndarray:
    return (lo <= _FREQS) & (hi > _FREQS)


SPEECH_BAND = _band(200, 4000)
F2_LOW_BAND = _band(700, 1700)  # second formant of back / rounded vowels
F2_HIGH_BAND = _band(1700, 3500)  # second formant of front / spread vowels


def _coef(tau_s: float) -> float:
    """One-pole smoothing coefficient per hop for a time constant."""
    return 1.0 - math.exp(-HOP_LENGTH / SAMPLE_RATE / tau_s)


@dataclass(frozen=True)
class LiteFeatureConfig:
    gate_db: float = 9.0  # speech must be this far above the noise floor
    min_speech_dbfs: float = -55.0  # and above this absolute level
    range_db: float = 24.0  # loudness range below the recent peak mapped onto openness
    max_open: float = 0.85  # openness at the speaker's peak loudness
    hangover_hops: int = 4  # keep the gate open this long after speech stops
    attack_s: float = 0.02
    release_s: float = 0.07
    width_s: float = 0.08
    floor_rise_db_per_s: float = 1.5  # how fast the noise floor may rise
    peak_decay_db_per_s: float = 1.0


class LiteFeatures:
    """Consumes audio in any chunk size and yields one (openness, width, voiced) per hop.

    Hop h is centred on sample h * HOP_LENGTH, so it can be computed once samples up to
    (h + 1) * HOP_LENGTH have arrived.
    """

    def __init__(self, config: LiteFeatureConfig | None = None) -> None:
        self.cfg = config or LiteFeatureConfig()
        self._pending = np.zeros(HOP_LENGTH, dtype=np.float32)  # the half window before the hop
        self._floor_db: float | None = None  # set from the first hop
        self._peak_db = -30.0
        self._hang = 0
        self._open = 0.0
        self._width = 0.0
        self.hops_done = 0

    def restart_at(self, hop: int) -> None:
        """Continue at a later hop after a gap in the stream; the level trackers are kept."""
        self._pending = np.zeros(HOP_LENGTH, dtype=np.float32)
        self.hops_done = hop

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed samples; returns an (n_hops, 3) float32 array of new hops: open, width, voiced."""
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = (len(data) - HOP_LENGTH) // HOP_LENGTH
        out = np.empty((max(n, 0), 3), dtype=np.float32)
        for i in range(n):
            out[i] = self._hop(data[i * HOP_LENGTH : i * HOP_LENGTH + WINDOW])
        self._pending = data[n * HOP_LENGTH :]
        self.hops_done += max(n, 0)
        return out

    def _hop(self, window: np.ndarray) -> tuple[float, float, float]:
        cfg = self.cfg
        power = np.abs(np.fft.rfft(window * _HANN, N_FFT)) ** 2 / _HANN_POWER
        speech_db = 10 * math.log10(float(power[SPEECH_BAND].sum()) / WINDOW * 2 + 1e-12)
        self._track_levels(speech_db)
        gate = max(self._floor_db + cfg.gate_db, cfg.min_speech_dbfs)
        if speech_db > gate:
            self._hang = cfg.hangover_hops
        else:
            self._hang = max(0, self._hang - 1)
        voiced = self._hang > 0
        target_open = 0.0
        target_width = 0.0
        if voiced:
            bottom = max(gate, self._peak_db - cfg.range_db)  # level of a closed mouth
            span = max(self._peak_db - bottom, cfg.range_db / 2)
            target_open = cfg.max_open * float(np.clip((speech_db - bottom) / span, 0, 1))
            low = float(power[F2_LOW_BAND].sum()) + 1e-12
            high = float(power[F2_HIGH_BAND].sum()) + 1e-12
            target_width = math.tanh(0.6 * math.log10(high / low) * 2 + 0.3)
        rate = cfg.attack_s if target_open > self._open else cfg.release_s
        self._open += _coef(rate) * (target_open - self._open)
        self._width += _coef(cfg.width_s) * (target_width - self._width)
        if not voiced and self._open < 0.02:  # snap shut: a still mouth in silence
            self._open = 0.0
            if abs(self._width) < 0.05:
                self._width = 0.0
        return self._open, self._width, float(voiced)

    def _track_levels(self, level_db: float) -> None:
        hop_s = HOP_LENGTH / SAMPLE_RATE
        if self._floor_db is None:
            self._floor_db = level_db
        elif level_db < self._floor_db:
            self._floor_db += 0.5 * (level_db - self._floor_db)
        else:
            self._floor_db += min(level_db - self._floor_db, self.cfg.floor_rise_db_per_s * hop_s)
        self._peak_db = max(level_db, self._peak_db - self.cfg.peak_decay_db_per_s * hop_s)


class HopTrack:
    """Streams ring audio through LiteFeatures and keeps the newest `capacity` hops.

    Shared by the lite engine (mouth shape) and the musetalk voice gate (voicing).
    """

    def __init__(self, capacity: int) -> None:
        self.features = LiteFeatures()
        self._fed = 0  # absolute sample index up to which audio went into the features
        self._first = 0  # oldest hop analysed since the last restart
        self._values = np.zeros((capacity, 3), dtype=np.float32)  # ring of (open, width, voiced)

    @property
    def hops_done(self) -> int:
        return self.features.hops_done

    def feed(self, ring, upto: int) -> None:
        """Analyse ring audio up to sample `upto` (an AudioRing; absolute index)."""
        while True:
            if self._fed < ring.start:  # fell more than the ring's length behind: resume there
                hop = -(-ring.start // HOP_LENGTH)
                self.features.restart_at(hop)
                self._fed, self._first = hop * HOP_LENGTH, hop
            if upto <= self._fed:
                return
            try:
                audio = ring.read(self._fed, upto)
                break
            except IndexError:  # the capture thread overwrote it since the check: resume
                if self._fed >= ring.start:
                    raise
        first = self.features.hops_done
        hops = self.features.push(audio)
        self._fed = upto
        self._values[np.arange(first, first + len(hops)) % len(self._values)] = hops

    def get(self, hop: int) -> np.ndarray | None:
        """(openness, width, voiced) of a hop, or None if not yet (or no longer) known."""
        if not max(self._first, self.hops_done - len(self._values)) <= hop < self.hops_done:
            return None
        return self._values[hop % len(self._values)]
