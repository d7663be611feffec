"""The remote engine: the Engine contract served by `livecam serve` over a WebSocket.

The laptop keeps microphone, ring, clock, compositor and sinks; each generate call sends the
audio the frames need (with its absolute sample index) and asks for the frames, and the faces
come back keyed by request id, stream id, avatar hash and frame index. While the server is
unreachable (at start, or after a drop) the local lite engine makes the frames and a
background thread reconnects with backoff. Imports neither Ray nor torch.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from livecam.audio.ring import AudioRing
from livecam.avatar.model import Avatar
from livecam.constants import SAMPLE_RATE
from livecam.engines.lite import LiteEngine
from livecam.remote import protocol as wire
from livecam.remote.generator import paste

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 3.0
REPLY_TIMEOUT_S = 1.0  # live: a reply this late and the frames come from the local engine
CONTEXT_S = 2.0  # audio sent before the first frame after (re)connecting
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)
STEADY_S = 10.0  # a connection lost sooner after it was made: the next try waits a step longer
RTT_WINDOW = 300
KEPT_REPLIES = 16  # replies that came out of turn, kept until read
CLOSE_DRAIN_S = 0.5  # closing waits this long at most for the replies still to come
CONNECTIONS = (1, 2)  # how many connections of the stream each call may go out on
POLL_S = 0.002  # how often the connections are looked at while a reply is awaited on two


class RemoteError(Exception):
    """The remote server cannot be used, with a message fit for the user."""


class RemoteRefused(RemoteError):
    """The server refused this client (token, version, engine): retrying will not help."""


def stream_url(url: str) -> str:
    """ws://HOST:PORT (or wss://) with the stream path added when none is given."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise RemoteError(f"--remote {url!r} is not a ws://HOST:PORT (or wss://) address")
    return url if parts.path.endswith(wire.PATH) else url.rstrip("/") + wire.PATH


def auto_connections(url: str) -> int:
    """Connections each call goes out on when the user did not say: two over a network (the
    first reply wins), one on loopback (no lost packets to hide; an SSH tunnel looks alike)."""
    return 1 if _loopback(stream_url(url)) else 2


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LinkStats:
    rtt_s: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RTT_WINDOW)
    )
    server_ms: float = 0.0
    queue: int = 0
    batch_streams: collections.Counter[int] = field(default_factory=collections.Counter)
    batch_frames: collections.Counter[int] = field(default_factory=collections.Counter)
    remote_frames: int = 0
    local_frames: int = 0
    timeouts: int = 0
    late: int = 0  # requests the server answered without faces: they queued past the wait
    reconnects: int = 0
    second_first: int = 0  # replies that came first on the second connection


@dataclass(frozen=True)
class ServerEngine:
    """The engine a server runs, from its ready message; equal for a server that came back
    running the same engine."""

    name: str
    tiers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    response_s: float
    needed: tuple  # the look-ahead table as sent
    samples_needed: Callable[[int], int] = field(compare=False)

    @classmethod
    def from_ready(cls, header: dict) -> ServerEngine:
        tiers, sizes = wire.field(header, "tiers", list), wire.field(header, "batch_sizes", list)
        if not tiers or not all(isinstance(t, str) for t in tiers):
            raise wire.ProtocolError("the server sent no tiers")
        if not sizes or not all(isinstance(b, int) and 0 < b <= wire.MAX_FRAMES for b in sizes):
            raise wire.ProtocolError("the server sent unusable batch sizes")
        needed = header.get("needed")
        samples_needed = wire.needed_from_table(needed)  # (checks it)
        return cls(wire.field(header, "engine", str), tuple(tiers), tuple(sizes),
                   float(wire.field(header, "response_s", (int, float))),
                   (needed["period"], needed["shift"], tuple(needed["table"])),
                   samples_needed)  # fmt: skip


def _newer(header: dict, request_id: int) -> bool:
    found = header.get("id")
    return isinstance(found, int) and found > request_id


class _Connection:
    """One authenticated stream on the server: audio sent so far, avatars it knows."""

    def __init__(self, ws: ClientConnection, stream: int) -> None:
        self.ws, self.stream = ws, stream
        self.sent: int | None = None  # absolute sample index sent up to
        self.avatars: set[str] = set()
        # replies to calls in flight that came while another answer was awaited (an avatar's)
        self.kept: collections.OrderedDict[int, tuple[dict, bytes]] = collections.OrderedDict()
        self.last_asked = 0  # the newest request's id
        self.last_answered = 0  # the newest reply's (replies come in order)

    def recv(self, kind: str, timeout: float, request_id: int | None = None) -> tuple[dict, bytes]:
        """The next message of `kind` (and id). Replies to older requests (given up on) are
        dropped; those to newer ones, kept for their turn."""
        if kind == "faces" and request_id in self.kept:
            return self.kept.pop(request_id)
        deadline = time.monotonic() + timeout
        while True:
            header, payload = wire.unpack(self.ws.recv(max(deadline - time.monotonic(), 0.0)))
            self._answered(header)
            if header["type"] == "error":
                raise RemoteError(f"the server says: {header.get('message')}")
            if header["type"] == kind and (request_id is None or header.get("id") == request_id):
                return header, payload
            if header["type"] == "faces" and (request_id is None or _newer(header, request_id)):
                self.kept[header.get("id")] = (header, payload)
                while len(self.kept) > KEPT_REPLIES:
                    self.kept.popitem(last=False)

    def ensure_avatar(self, sha: str, blob: bytes) -> None:
        if sha in self.avatars:
            return
        self.ws.send(wire.pack({"type": "avatar", "sha256": sha}))  # known there already?
        header, _ = self.recv("avatar", OPEN_TIMEOUT_S)
        if not header.get("known"):
            self.ws.send(wire.pack({"type": "avatar", "sha256": sha}, blob))
            header, _ = self.recv("avatar", OPEN_TIMEOUT_S + len(blob) / 1e6)
        if header.get("sha256") != sha or not header.get("known"):
            raise RemoteError("the server did not take the avatar")
        self.avatars.add(sha)

    def send_request(
        self,
        ring: AudioRing,
        upto: int,
        sha: str,
        frames: list[int],
        tier: str,
        request_id: int,
        wait_s: float,
    ) -> None:
        """Ask for faces, with the audio up to `upto` the server has not had yet (the last
        piece rides in the request: one message per call in the common case). Replies come
        in order, later (`reply`): several requests may be in flight."""
        start = max(self.sent if self.sent is not None else upto - int(CONTEXT_S * SAMPLE_RATE), 0)
        start = max(start, ring.start)
        while upto - start > wire.MAX_AUDIO_SAMPLES:
            stop = start + wire.MAX_AUDIO_SAMPLES
            audio = ring.read(start, stop).tobytes()
            self.ws.send(wire.pack({"type": "audio", "start": start}, audio))
            start = stop
        audio = ring.read(start, upto).tobytes() if start < upto else b""
        self.sent = max(self.sent or 0, upto)
        header = {"type": "frames", "id": request_id, "avatar": sha, "frames": frames,
                  "tier": tier, "audio_start": start, "wait_ms": wait_s * 1e3}  # fmt: skip
        self.ws.send(wire.pack(header, audio))
        self.last_asked = request_id

    def drain(self, timeout: float) -> bool:
        """Read until the newest request is answered (True) or `timeout` passes: a server
        still making faces for a connection that closed logs errors in Ray's proxy."""
        deadline = time.monotonic() + timeout
        while self.last_answered < self.last_asked:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._answered(wire.unpack(self.ws.recv(left))[0])
        return True

    def _answered(self, header: dict) -> None:
        found = header.get("id")
        if header.get("type") == "faces" and isinstance(found, int):
            self.last_answered = max(self.last_answered, found)

    def reply(
        self, request_id: int, sha: str, frames: list[int], timeout: float
    ) -> tuple[dict, bytes]:
        """The reply to a request (TimeoutError if it is not there within `timeout`)."""
        header, payload = self.recv("faces", timeout, request_id)
        if (
            header.get("stream") != self.stream
            or header.get("avatar") != sha
            or header.get("frames") != frames
        ):  # never show another stream's or avatar's face
            raise RemoteError("the server answered with faces of another stream or avatar")
        return header, payload


@dataclass(frozen=True)
class Pending:
    """A request sent on a stream's connections, its reply not read yet."""

    conns: tuple[_Connection, ...]
    request_id: int
    sha: str
    frames: list[int]
    sent: float  # perf_counter() when it went out


class Link:
    """The connection to the server, shared by a stream's engines (one per avatar shown):
    requests go out as their audio arrives, several in flight, and their replies are read in
    order; it reconnects in the background after a drop.

    With two connections (the default over a network) each request goes out on both
    (the server generates it once): a lost packet holds up every reply behind it on its
    TCP connection until it is resent, a round trip or more, and at 1 % loss that is a
    third of the calls; the same reply on the other connection is rarely held up too."""

    def __init__(
        self,
        url: str,
        token: str,
        fps: float,
        idle: bool,
        *,
        connections: int,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        """`connections`: 1, or 2 (each call on both, the first reply wins)."""
        if connections not in CONNECTIONS:
            raise ValueError(f"connections must be 1 or 2, not {connections!r}")
        self.url = stream_url(url)
        self.reply_timeout_s = reply_timeout_s
        self.token, self.fps, self.idle = token, fps, idle
        self.server: ServerEngine | None = None  # what the server said it runs
        # on loopback the server sends raw faces if it runs here (not at an SSH tunnel's end)
        self.encoding = wire.AUTO if _loopback(self.url) else "jpeg"
        self.connections = connections
        self.stats = LinkStats()
        self.problem: str | None = None  # why the server is not used right now
        self._conn: _Connection | None = None
        self._second: _Connection | None = None  # the stream's second connection
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reconnecting: threading.Thread | None = None
        self._connected_at = 0.0  # monotonic
        self._quick_losses = 0  # connections in a row lost within STEADY_S of being made

    def connect(self) -> None:
        """Open and authenticate a stream (and its second connection where two are asked
        for); RemoteError (RemoteRefused) if that fails."""
        ws, header, server = self._open()
        second = self._join(header) if self.connections > 1 else None
        with self._lock:
            self._conn = _Connection(ws, int(header["stream"]))
            self._second = second
            self.server, self.problem = server, None
            self._connected_at = time.monotonic()
        log.info("remote generation: stream %d on %s, %s faces%s", header["stream"], self.url,
                 header.get("encoding"), " (two connections)" if second else "")  # fmt: skip

    def _join(self, ready: dict) -> _Connection | None:
        """A second connection to the stream of `ready`; None where the server has none."""
        stream, key = ready["stream"], ready.get("key")
        if not isinstance(key, str):
            return None  # a server that does not join connections
        try:
            ws, header, _ = self._open({"join": {"stream": stream, "key": key}})
        except RemoteError as exc:
            log.info("one connection only: %s", exc)
            return None
        if header["stream"] != stream:
            ws.close()
            return None
        return _Connection(ws, stream)

    def _open(self, extra: dict | None = None) -> tuple[ClientConnection, dict, ServerEngine]:
        """A connection that said hello (with `extra`) and was answered ready."""
        try:
            # entered by hand: the stream outlives this call (websockets >= 17.1 warns
            # about connect() used outside `with`; __enter__ works on 15 and later)
            ws = connect(
                self.url,
                open_timeout=OPEN_TIMEOUT_S,
                max_size=wire.MAX_MESSAGE,
                compression=None,
                close_timeout=1,
                proxy=None,
            ).__enter__()
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise RemoteError(f"cannot reach the livecam server at {self.url}: {exc}") from None
        try:
            ws.send(
                wire.pack(
                    {
                        "type": "hello",
                        "version": wire.VERSION,
                        "token": self.token,
                        "fps": self.fps,
                        "idle": self.idle,
                        "encoding": self.encoding,
                        "host": wire.host_id(),
                        **(extra or {}),
                    }
                )
            )
            header, _ = wire.unpack(ws.recv(timeout=OPEN_TIMEOUT_S))
        except (OSError, TimeoutError, ConnectionClosed, wire.ProtocolError) as exc:
            ws.close()
            raise RemoteError(f"the livecam server at {self.url} did not answer: {exc}") from None
        if header["type"] != "ready":
            ws.close()
            raise RemoteRefused(
                f"the livecam server at {self.url} refused this client: "
                f"{header.get('message', header)}"
            )
        try:
            server = ServerEngine.from_ready(header)
        except wire.ProtocolError as exc:
            ws.close()
            raise RemoteRefused(
                f"the livecam server at {self.url} is not compatible: {exc}"
            ) from None
        return ws, header, server

    def upload(self, sha: str, blob: bytes) -> None:
        """Send an avatar now (before the camera runs), not with the first frames."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.ensure_avatar(sha, blob)
            except (OSError, TimeoutError, ConnectionClosed, wire.ProtocolError) as exc:
                raise RemoteError(f"cannot send the avatar to {self.url}: {exc}") from None
            if self._second is not None:
                try:
                    self._second.ensure_avatar(sha, blob)
                except (OSError, TimeoutError, ConnectionClosed, RemoteError,
                        wire.ProtocolError) as exc:  # fmt: skip
                    self._lose(self._second, exc)

    def start_reconnecting(self, reason: str) -> None:
        self.problem = reason
        if self._reconnecting is None or not self._reconnecting.is_alive():
            self._reconnecting = threading.Thread(
                target=self._reconnect, name="remote-reconnect", daemon=True
            )
            self._reconnecting.start()

    def _reconnect(self) -> None:
        """Tries with backoff; after connections lost soon after they were made (a server
        that refuses each request), from further up the backoff: no storm of reconnects."""
        for attempt in itertools.count(self._quick_losses):
            if self._closed.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                return
            try:
                self.connect()
            except RemoteRefused as exc:
                self.problem = str(exc)
                return
            except RemoteError as exc:
                self.problem = str(exc)
                continue
            self.stats.reconnects += 1
            return

    def send(
        self,
        server: ServerEngine,
        sha: str,
        blob: bytes,
        ring: AudioRing,
        frames: list[int],
        tier: str,
        upto: int,
    ) -> Pending | None:
        """Ask for faces, planned for `server`'s engine; the request in flight, or None (then
        the caller makes local frames): not connected, or the server runs another engine."""
        with self._lock:
            conn = self._conn
            if conn is None or self.server != server:
                return None
            request_id = next(self._ids)
            try:
                conn.ensure_avatar(sha, blob)
                conn.send_request(ring, upto, sha, frames, tier, request_id, self.reply_timeout_s)
            except (TimeoutError, IndexError):  # a late avatar answer; audio overwritten
                self.stats.timeouts += 1
                return None
            except (OSError, ConnectionClosed, RemoteError, wire.ProtocolError) as exc:
                self._lose(conn, exc)
                return None
            conns = (conn,)
            second = self._second
            if second is not None:
                try:
                    second.ensure_avatar(sha, blob)
                    second.send_request(ring, upto, sha, frames, tier, request_id,
                                        self.reply_timeout_s)  # fmt: skip
                    conns = (conn, second)
                except (OSError, TimeoutError, IndexError, ConnectionClosed, RemoteError,
                        wire.ProtocolError) as exc:  # fmt: skip
                    self._lose(second, exc)
        return Pending(conns, request_id, sha, frames, time.perf_counter())

    def receive(
        self, pending: Pending, timeout: float, shape: tuple[int, ...]
    ) -> tuple[bool, list[list[wire.Patch]] | None]:
        """(answered, patches per frame): (False, None) while the reply is not there after
        `timeout`; (True, None) when it never will be: too late, or the connection was lost
        (then the caller makes local frames)."""
        with self._lock:
            if self._conn is None or self._conn is not pending.conns[0]:
                return True, None
            left = pending.sent + self.reply_timeout_s - time.perf_counter()
            try:
                header, payload = self._first_reply(pending, max(min(timeout, left), 0.0))
                if header.get("late") is True:  # the server had too much to make it in time
                    self.stats.late += 1
                    return True, None
                patches = _decode(header, payload, len(pending.frames), shape)
            except TimeoutError:
                if left > timeout:
                    return False, None
                self.stats.timeouts += 1
                return True, None
            except (OSError, ConnectionClosed, RemoteError, wire.ProtocolError) as exc:
                self._lose(self._conn, exc)
                return True, None
        s = self.stats
        s.rtt_s.append(time.perf_counter() - pending.sent)
        s.server_ms, s.queue = _number(header, "server_ms"), int(_number(header, "queue"))
        s.batch_streams[int(_number(header, "batch_streams"))] += 1
        s.batch_frames[int(_number(header, "batch_frames"))] += 1
        return True, patches

    def _first_reply(self, pending: Pending, timeout: float) -> tuple[dict, bytes]:
        """The reply from whichever connection has it first (TimeoutError if none does
        within `timeout`); the second connection failing leaves the first. Both are read
        each time, so neither holds the copies that came second."""
        conn, second = self._conn, self._second
        if second is None or second not in pending.conns:
            return conn.reply(pending.request_id, pending.sha, pending.frames, timeout)
        deadline = time.perf_counter() + timeout
        while True:
            found = None
            with contextlib.suppress(TimeoutError):
                found = conn.reply(pending.request_id, pending.sha, pending.frames, 0.0)
            try:
                copy = second.reply(pending.request_id, pending.sha, pending.frames, 0.0)
                if found is None:
                    self.stats.second_first += 1
                    return copy
            except TimeoutError:
                pass
            except (OSError, ConnectionClosed, RemoteError, wire.ProtocolError) as exc:
                self._lose(second, exc)
                if found is None:
                    return conn.reply(pending.request_id, pending.sha, pending.frames,
                                      max(deadline - time.perf_counter(), 0.0))  # fmt: skip
            if found is not None:
                return found
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            time.sleep(min(POLL_S, left))

    def _lose(self, conn: _Connection, exc: Exception) -> None:
        """A connection failed (called under the lock). The second: the first goes on alone
        (until the stream reconnects). The first: local frames until it is back."""
        conn.ws.close()
        if conn is self._second:
            self._second = None
            log.info("the second connection to %s failed (%s): one from now on", self.url, exc)
            return
        self._conn = None
        if self._second is not None:
            self._second.ws.close()
            self._second = None
        quick = time.monotonic() - self._connected_at < STEADY_S
        self._quick_losses = self._quick_losses + 1 if quick else 0
        log.warning("remote generation lost (%s): local frames until it is back", exc)
        self.start_reconnecting(f"lost the livecam server at {self.url} ({exc})")

    def status_line(self) -> str:
        s = self.stats
        if self._conn is None:
            return f"{self.url} · reconnecting · {s.local_frames} local frames"
        rtt = np.percentile(list(s.rtt_s), [50, 95]) * 1e3 if s.rtt_s else (0.0, 0.0)
        batch = s.batch_streams.most_common(1)[0][0] if s.batch_streams else 0
        late = f" ({s.timeouts + s.late} replies too late)" * bool(s.timeouts + s.late)
        second = f" · two connections, {s.second_first} replies first on the second" * bool(
            self._second
        )
        return (
            f"{self.url} · rtt {rtt[0]:.0f}/{rtt[1]:.0f} ms p50/p95 · remote queue "
            f"{s.queue} · batches of {batch} streams · {s.local_frames} local frames{late}{second}"
        )

    def close(self) -> None:
        """Closes the connections once the requests in flight are answered (at most
        CLOSE_DRAIN_S): the server is not left making faces for nobody."""
        self._closed.set()
        with self._lock:
            for conn in (self._conn, self._second):
                if conn is not None:
                    with contextlib.suppress(TimeoutError, OSError, ConnectionClosed,
                                             wire.ProtocolError):  # fmt: skip
                        conn.drain(CLOSE_DRAIN_S)
                    conn.ws.close()
            self._conn = self._second = None


def _number(header: dict, key: str) -> float:
    """A figure the server reports (for the dashboard only): 0 when missing or not a number."""
    value = header.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e9
    return float(value) if ok else 0.0


def _decode(
    header: dict, payload: bytes, n_frames: int, shape: tuple[int, ...]
) -> list[list[wire.Patch]]:
    """Patches per frame, each checked to lie inside the avatar image of `shape`."""
    index = wire.field(header, "patches", list)
    encoding = wire.field(header, "encoding", str)
    out: list[list[wire.Patch]] = [[] for _ in range(n_frames)]
    offset = 0
    for entry in index:
        if not isinstance(entry, list) or len(entry) != 6:
            raise wire.ProtocolError("malformed patch index")
        if not all(isinstance(v, int) for v in entry):
            raise wire.ProtocolError("malformed patch index")
        i, x, y, w, h, size = entry
        if not (0 <= i < n_frames and size >= 0 and offset + size <= len(payload)):
            raise wire.ProtocolError("patch index points outside the reply")
        if not (w > 0 and h > 0 and 0 <= x <= shape[1] - w and 0 <= y <= shape[0] - h):
            raise wire.ProtocolError(f"a face patch at {x},{y} lies outside the avatar")
        out[i].append((x, y, wire.decode_patch(payload[offset : offset + size], w, h, encoding)))
        offset += size
    return out


Plan = ServerEngine | LiteEngine  # tiers, batch sizes, response and look-ahead


def _outline(plan: Plan) -> tuple:
    """What the pipeline plans with; two periods of a look-ahead table fix it for every frame."""
    needed = tuple(plan.samples_needed(k) for k in range(2 * wire.MAX_PERIOD))
    return plan.tiers, plan.batch_sizes, plan.response_s, needed


class RemoteEngine:
    """The Engine contract over a Link; a local lite engine on the same avatar stands in while
    the server is unreachable and makes the idle faces (the client holds the avatar)."""

    def __init__(
        self, link: Link, avatar: Avatar, fallback: LiteEngine, plan: Plan | None = None
    ) -> None:
        """Plans with the server's tiers, batch sizes and look-ahead where it answered already
        (else the local engine's until `follow_server`)."""
        self.link, self.avatar, self.local = link, avatar, fallback
        self.plan: Plan = plan or link.server or fallback
        self.tier = self.tiers[0]
        self.sha, self.blob = wire.avatar_blob(avatar)
        self._base = np.ascontiguousarray(avatar.image)

    @property
    def name(self) -> str:
        return f"{self.plan.name} (remote)"

    @property
    def tiers(self) -> tuple[str, ...]:
        return self.plan.tiers

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.plan.batch_sizes

    @property
    def response_s(self) -> float:
        return self.plan.response_s

    def follow_server(self) -> bool:
        """Plan with the engine of the server the link has reached since (unreachable at the
        start, or back with another engine); True where that changed the plan."""
        server = self.link.server
        if server is None or server == self.plan:
            return False
        changed = _outline(server) != _outline(self.plan)
        self.plan = server
        if self.tier not in self.tiers:
            self.tier = self.tiers[0]
        return changed

    @property
    def warnings(self) -> tuple[str, ...]:
        problem = self.link.problem
        return (f"{problem}: showing local lite frames, retrying",) if problem else ()

    def status_line(self) -> str:
        return self.link.status_line()

    def set_tier(self, tier: str) -> None:
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r} for the remote engine: {self.tiers}")
        self.tier = tier

    def samples_needed(self, frame: int) -> int:
        return self.plan.samples_needed(frame)

    def submit(self, ring: AudioRing, frames: Sequence[int]) -> RemoteCall:
        """Send the request for `frames` and return at once (several may be in flight)."""
        t0 = time.perf_counter()
        frames = list(frames)
        self.local.analysis.feed(ring, frames[-1])  # cheap; keeps local frames ready
        upto = self.samples_needed(frames[-1])
        pending = None
        if isinstance(self.plan, ServerEngine):  # else: local frames until it follows one
            pending = self.link.send(self.plan, self.sha, self.blob, ring, frames, self.tier, upto)
        return RemoteCall(self, ring, frames, pending, time.perf_counter() - t0)

    def round_trip_s(self) -> float | None:
        """The fastest recent round trip: the rest is queueing, which more calls in flight
        would only lengthen."""
        rtts = tuple(self.link.stats.rtt_s)
        return min(rtts) if rtts else None

    def generate(self, ring: AudioRing, frames: Sequence[int]) -> list[np.ndarray]:
        call = self.submit(ring, frames)
        while (faces := call.wait(self.link.reply_timeout_s)) is None:
            pass
        return faces

    def local_faces(self, ring: AudioRing, frames: list[int]) -> list[np.ndarray]:
        self.link.stats.local_frames += len(frames)
        self.local.set_tier(self.tier if self.tier in self.local.tiers else "full")
        return self.local.generate(ring, frames)

    def generate_silent(self, frames: Sequence[int]) -> list[np.ndarray]:
        return self.local.generate_silent(frames)

    def for_avatar(self, avatar: Avatar) -> RemoteEngine:
        return RemoteEngine(self.link, avatar, self.local.for_avatar(avatar), self.plan)

    def close(self) -> None:
        self.link.close()


class RemoteCall:
    """A request for faces in flight. `busy_s`: this machine's and the server's own time for
    it (what bounds how many calls per second a stream can make), not the round trip."""

    def __init__(self, engine: RemoteEngine, ring: AudioRing, frames: list[int],
                 pending: Pending | None, busy_s: float) -> None:  # fmt: skip
        self.engine, self.ring, self.frames, self.pending = engine, ring, frames, pending
        self.busy_s = busy_s

    def wait(self, timeout: float) -> list[np.ndarray] | None:
        """The faces, or None while the reply is still not there after `timeout` seconds;
        local ones where the server did not answer in time or the connection dropped."""
        link, base = self.engine.link, self.engine._base
        patches = None
        if self.pending is not None:
            answered, patches = link.receive(self.pending, timeout, base.shape)
            if not answered:
                return None
        t0 = time.perf_counter()  # (the wait for the reply is not this machine's work)
        if patches is None:
            if self.pending is not None:  # unanswered: the server had it all this while
                self.busy_s += t0 - self.pending.sent  # (an overloaded one: the stream backs off)
            faces = self.engine.local_faces(self.ring, self.frames)
        else:
            link.stats.remote_frames += len(self.frames)
            faces = [paste(base, p) for p in patches]
            self.busy_s += link.stats.server_ms / 1e3
        self.busy_s += time.perf_counter() - t0
        return faces


def open_remote(
    url: str,
    token: str,
    avatar: Avatar,
    fallback: LiteEngine,
    *,
    remote_only: bool = False,
    reply_timeout_s: float = REPLY_TIMEOUT_S,
    connections: int | None = None,
) -> RemoteEngine:
    """Connect, or (unless remote_only) start with local frames and keep trying.
    `connections`: 1 or 2 per call; None: auto_connections(url)."""
    count = auto_connections(url) if connections is None else connections
    link = Link(url, token, fallback.fps, fallback.idle_motion, connections=count,
                reply_timeout_s=reply_timeout_s)  # fmt: skip
    try:
        link.connect()
    except RemoteRefused:
        raise
    except RemoteError as exc:
        if remote_only:
            raise
        log.warning("%s: showing local lite frames until it answers", exc)
        link.start_reconnecting(str(exc))
    engine = RemoteEngine(link, avatar, fallback)
    try:
        link.upload(engine.sha, engine.blob)
    except RemoteError:
        engine.close()
        raise
    return engine
