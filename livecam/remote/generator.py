"""Stateless face generation for the server: one call renders frames of several streams.

Each request carries everything its frames need (avatar hash, frame indices, per-frame state
from the stream's audio analysis, the audio window a neural engine encodes, tier, fps), so any
replica can serve it and a failed call can be retried elsewhere. Prepared avatars (lite patch
banks, musetalk latents) are kept in an LRU by content hash; the caller prepares a missing one.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np

from livecam.avatar.model import Avatar
from livecam.engines.lite import LiteEngine, MouthTrack
from livecam.remote.protocol import Patch

PREPARED_AVATARS = 16  # per replica; a lite avatar takes ~10 MB prepared


@dataclass(frozen=True)
class RenderRequest:
    stream: int
    avatar: str  # content hash
    frames: tuple[int, ...]
    # per frame, from the stream's analysis: lite (openness, width), musetalk (voice weight,)
    conditions: tuple[tuple[float, ...], ...]
    tier: str
    fps: float
    idle: bool
    audio_start: int = 0  # musetalk: the window its features are encoded from
    audio: np.ndarray | None = None
    asked_at: float = 0.0  # wall clock at the ingress (replicas may run on other hosts)
    wait_s: float | None = None  # how long its client waits for the faces; None: no limit

    def stale(self, now: float, making_s: float = 0.0) -> bool:
        """Its faces, made in `making_s` from `now`, would come after its client's wait (it
        queued too long): the client shows its own frames by then."""
        return self.wait_s is not None and now + making_s - self.asked_at > self.wait_s


@dataclass(frozen=True)
class RenderResult:
    stream: int
    frames: tuple[int, ...]
    patches: tuple[tuple[Patch, ...], ...]  # per frame: the regions the engine changed
    batch_streams: int  # requests merged into the call that made these
    batch_frames: int
    seconds: float  # the merged call's time
    late: bool = False  # not generated: it queued past its client's wait


class MissingAvatar(KeyError):
    """The avatar is not prepared here and could not be fetched."""


class EngineInfo(NamedTuple):
    name: str
    tiers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    response_s: float


E = TypeVar("E")


class PreparedEngines(Generic[E]):
    """A replica's engines per (avatar, fps, idle motion); beyond `capacity` the least
    recently used one is dropped (its client uploads the avatar again)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._engines: collections.OrderedDict[tuple, E] = collections.OrderedDict()

    @staticmethod
    def _key(request: RenderRequest) -> tuple:
        return request.avatar, request.fps, request.idle

    def __contains__(self, request: RenderRequest) -> bool:
        return self._key(request) in self._engines

    def add(self, request: RenderRequest, engine: E) -> None:
        self._engines[self._key(request)] = engine
        while len(self._engines) > self.capacity:
            self._engines.popitem(last=False)

    def get(self, request: RenderRequest) -> E:
        """The request's engine, now the most recently used; MissingAvatar if none."""
        key = self._key(request)
        engine = self._engines.get(key)
        if engine is None:
            raise MissingAvatar(request.avatar)
        self._engines.move_to_end(key)
        return engine


class LiteGenerator:
    info = EngineInfo("lite", LiteEngine.tiers, LiteEngine.batch_sizes, LiteEngine.response_s)

    def __init__(self, capacity: int = PREPARED_AVATARS) -> None:
        self._engines: PreparedEngines[LiteEngine] = PreparedEngines(capacity)

    @property
    def capacity(self) -> int:
        return self._engines.capacity

    @capacity.setter
    def capacity(self, avatars: int) -> None:
        self._engines.capacity = avatars

    def samples_needed(self, fps: float) -> Callable[[int], int]:
        return MouthTrack(fps).samples_needed

    def has(self, request: RenderRequest) -> bool:
        return request in self._engines

    def prepare(self, request: RenderRequest, avatar: Avatar) -> None:
        self._engines.add(request, LiteEngine(avatar, request.fps, request.idle))

    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        """All frames of all requests in one call (the lite engine renders them in turn)."""
        t0 = time.perf_counter()
        out = []
        for request in requests:
            engine = self._engines.get(request)
            engine.set_tier(request.tier)
            regions = _regions(engine.renderer.avatar)
            patches = []
            for k, (openness, width) in zip(request.frames, request.conditions, strict=True):
                face = engine.face(k, openness, width)
                patches.append(tuple((x, y, face[y : y + h, x : x + w]) for x, y, w, h in regions))
            out.append(tuple(patches))
        seconds = time.perf_counter() - t0
        n_frames = sum(len(r.frames) for r in requests)
        return [
            RenderResult(r.stream, r.frames, p, len(requests), n_frames, seconds)
            for r, p in zip(requests, out, strict=True)
        ]


def _regions(avatar: Avatar) -> list[tuple[int, int, int, int]]:
    """x, y, w, h of what the lite renderer changes in a still avatar: mouth and eyes."""
    return [(bank.x, bank.y, *bank.size) for bank in (avatar.mouth, avatar.eyes)]


def paste(base: np.ndarray, patches: list[Patch] | tuple[Patch, ...]) -> np.ndarray:
    """The face: a copy of the avatar's base image with the patches in place."""
    face = base.copy()
    for x, y, patch in patches:
        h, w = patch.shape[:2]
        face[y : y + h, x : x + w] = patch
    return face
