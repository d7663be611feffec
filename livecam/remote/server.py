"""`livecam serve`: a Ray Serve application that generates faces for remote livecam clients.

Two deployments: the WebSocket ingress (FastAPI) pins each stream to its connection and keeps
the stream's audio and mouth analysis there; the generator (one replica per GPU, or per CPU
share) is stateless per call, merges several streams' requests into one call with
`@serve.batch`, and keeps prepared avatars in an LRU by content hash (the ingress calls it by
value, without the avatar, and again by reference with it where a replica has not prepared
that avatar yet). Imports Ray: only the server side loads this module. (No `from __future__
import annotations`: FastAPI reads the WebSocket parameter's annotation at run time.)
"""

import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from ray import serve

from livecam.limits import LimitError, check_fps
from livecam.remote import protocol as wire
from livecam.remote.generator import (
    EngineInfo,
    LiteGenerator,
    MissingAvatar,
    RenderRequest,
    RenderResult,
)
from livecam.remote.pool_status import PoolCounters, report_status
from livecam.remote.scaling import follow_gpus
from livecam.remote.stream import StreamState
from livecam.remote.tokens import read_token
from livecam.service.notify import Notifier
from livecam.session import EngineError

log = logging.getLogger(__name__)

APP_NAME = "livecam"
ONE = {"min_replicas": 1, "max_replicas": 1}  # an autoscaling config that keeps one replica
ENGINES = ("lite", "musetalk")
MAX_BATCH_STREAMS = 16  # requests merged into one generator call
BATCH_WAIT_S = 0.0  # no waiting: requests that queued during the last call form the batch
HELLO_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 5.0  # the ingress answers `livecam serve`'s status read within this
JOIN_CHECK_S = 5.0  # --address HOST:PORT must accept a connection within this
RETRY_FOR_S = 2.0  # a request whose replica died is retried on another for this long
MAX_ERRORS = 16  # protocol errors on one connection before it is closed
UPLOADED_AVATARS = 32  # per ingress replica
CLOSE_AUTH, CLOSE_PROTOCOL = 4401, 4400
MAX_STREAMS = 256  # WebSocket connections per ingress replica (each is one ongoing request)
KEPT_CALLS = 64  # a stream's latest requests, for their copies on its other connection
QUIET = {"log_level": "WARNING", "enable_access_log": False}
# Generator calls go by value over the replicas' gRPC channel (not through Ray's object store).
# Its 4 MiB message limit would refuse a musetalk reply of 16 large faces; what crosses it is
# bounded by the checks at the WebSocket, so both ends allow more.
GRPC_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(1 << 30)}
# and the ingress runs two of Ray Serve's low-latency settings (from its documented
# RAY_SERVE_THROUGHPUT_OPTIMIZED mode, whose direct ingress, a cluster-wide flag, would serve
# the WebSocket from a port of its own range beside --port): its code and its handle's router
# on the replica's own event loop, not behind a hop to another thread.
INGRESS_ENV = {
    **GRPC_ENV,
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

api = FastAPI()
# serve.ingress copies the class when decorating: module names it uses must exist before it


async def _send(ws: WebSocket, header: dict, payload: bytes = b"") -> None:
    await ws.send_bytes(wire.pack(header, payload))


async def _refuse(ws: WebSocket, code: str, message: str) -> None:
    with _quiet():
        await _send(ws, {"type": "error", "code": code, "message": message})
        await ws.close(CLOSE_AUTH if code == "auth" else CLOSE_PROTOCOL, code)
    return None


def _quiet() -> contextlib.AbstractContextManager:
    """Ignore failures while closing a connection that may already be gone."""
    return contextlib.suppress(Exception)


@dataclass
class Stream:
    """A stream and what its connections share: a client over a lossy network sends each
    request on two (a lost packet holds up only one), and each request is generated once."""

    state: StreamState
    key: str = field(default_factory=lambda: secrets.token_hex(16))  # to join it
    calls: collections.OrderedDict[int, tuple[tuple[int, ...], asyncio.Future]] = field(
        default_factory=collections.OrderedDict
    )
    connections: int = 1


@serve.deployment(
    max_ongoing_requests=2 * MAX_BATCH_STREAMS,
    health_check_period_s=1.0,
    health_check_timeout_s=5.0,
    logging_config=QUIET,
)
class Generator:
    def __init__(
        self, engine: str, models_dir: Path | None, random_weights: str | None = None
    ) -> None:
        if engine == "musetalk":
            from livecam.remote.musetalk_generator import MuseTalkGenerator

            self.impl: Any = MuseTalkGenerator(models_dir, random_weights=random_weights)
        else:
            self.impl = LiteGenerator()
        self.last_call_s = 0.0  # the last batch's time: about what the next one takes

    def describe(self, fps: float) -> tuple[EngineInfo, dict]:
        """The engine's tiers, batch sizes, response and look-ahead table at this frame rate."""
        return self.impl.info, wire.needed_table(self.impl.samples_needed(fps), fps)

    @serve.batch(max_batch_size=MAX_BATCH_STREAMS, batch_wait_timeout_s=BATCH_WAIT_S)
    async def render(self, calls: list[tuple[RenderRequest, list]]) -> list[RenderResult | None]:
        return await self._render_batch(calls)

    async def _render_batch(
        self, calls: list[tuple[RenderRequest, list]]
    ) -> list[RenderResult | None]:
        """Each call's faces; None for a call whose avatar is not prepared here and that
        came without it (the ingress sends it again with the avatar's ObjectRef). Calls that
        would come after their client's wait (they queued too long) are answered late, not
        made: an overloaded pool works on what can still be shown, and its queue drains."""
        now = time.time()
        late = {id(request) for request, _ in calls if request.stale(now, self.last_call_s)}
        if len(late) == len(calls):  # by the estimate alone: keep the newest, which re-times it
            alive = [request for request, _ in calls if not request.stale(now)]
            if alive:
                late.discard(id(max(alive, key=lambda request: request.asked_at)))
        fresh = [(request, ref) for request, ref in calls if id(request) not in late]
        for request, ref in fresh:
            if not self.impl.has(request) and ref:  # ref: [ObjectRef] of the uploaded npz
                data = await ref[0]
                self.impl.prepare(request, wire.avatar_from_blob(data, request.avatar))
        # (checked after all are prepared: preparing one may have dropped another)
        ready = [request for request, _ in fresh if self.impl.has(request)]
        results: dict[int, RenderResult] = {}
        if ready:
            t0 = time.perf_counter()
            results = dict(zip(map(id, ready), self.impl.render(ready), strict=True))
            self.last_call_s = time.perf_counter() - t0
        for request, _ in calls:
            if id(request) in late:
                results[id(request)] = RenderResult(request.stream, request.frames, (), 0, 0, 0.0,
                                                    late=True)  # fmt: skip
        return [results.get(id(request)) for request, _ in calls]


@serve.deployment(
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV}},
    max_ongoing_requests=MAX_STREAMS,
    logging_config=QUIET,
)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: Any, token_sha256: str) -> None:
        self.generator = generator
        # by value (GRPC_ENV): 1-3 ms less a call; an avatar's ObjectRef goes by reference
        self.by_value = generator.options(_by_reference=False)
        self.token_sha256 = token_sha256
        self.engines: dict[float, tuple[EngineInfo, dict]] = {}  # per frame rate
        self.avatars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.streams = itertools.count(1)
        self.joinable: dict[int, Stream] = {}  # by stream id
        self.in_flight = 0  # generator calls waiting, over all streams: the remote queue
        self.counters = PoolCounters()
        self.host = wire.host_id()  # a loopback client here gets raw faces, others JPEG

    def stats(self) -> dict:
        """The pool's counts so far (for `livecam serve`'s status lines)."""
        return self.counters.snapshot(len(self.joinable), self.in_flight)

    @api.websocket(wire.PATH)
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        stream = None
        try:
            stream = await self._hello(ws)
            errors = 0
            while stream is not None and errors < MAX_ERRORS:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    header, payload = wire.unpack(message.get("bytes") or message.get("text"))
                    await self._handle(ws, stream, header, payload)
                except wire.ProtocolError as exc:
                    errors += 1
                    await _send(ws, {"type": "error", "code": "bad_request", "message": str(exc)})
            if stream is not None:
                await ws.close(CLOSE_PROTOCOL, "too many malformed messages")
        except WebSocketDisconnect:
            return
        except Exception:  # one stream's failure never takes the replica down
            log.exception("stream failed")
            with _quiet():
                await _send(ws, {"type": "error", "code": "internal", "message": "server error"})
                await ws.close(1011)
        finally:
            if stream is not None:
                stream.connections -= 1
                if not stream.connections:
                    self.joinable.pop(stream.state.stream, None)

    async def _hello(self, ws: WebSocket) -> Stream | None:
        """The first message must be a hello with the right token: nothing else is read.
        With "join": {stream, key} (the key its ready message gave) it is a second
        connection of that stream."""
        try:
            message = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT_S)
            header, _ = wire.unpack(message.get("bytes") or message.get("text") or b"")
        except (TimeoutError, wire.ProtocolError) as exc:
            return await _refuse(ws, "bad_request", f"expected a hello message: {exc}")
        token = header.get("token")
        digest = hashlib.sha256(token.encode() if isinstance(token, str) else b"").hexdigest()
        if header.get("type") != "hello" or not hmac.compare_digest(digest, self.token_sha256):
            return await _refuse(ws, "auth", "the server refused the token: check --token-file")
        try:
            if wire.field(header, "version", int) != wire.VERSION:
                raise wire.ProtocolError(
                    f"protocol version {header['version']} is not {wire.VERSION}: update livecam"
                )
            fps = check_fps(float(wire.field(header, "fps", (int, float))))
            asked = wire.field(header, "encoding", str)
            if asked not in wire.HELLO_ENCODINGS:
                raise wire.ProtocolError(f"encoding must be one of {wire.HELLO_ENCODINGS}")
            wire.field(header, "idle", bool)
            joined = self._joined(header.get("join"))
        except (wire.ProtocolError, LimitError) as exc:
            return await _refuse(ws, "bad_request", str(exc))
        if joined is not None:
            joined.connections += 1
            await _send(ws, self._ready(joined))
            return joined
        if fps not in self.engines:
            self.engines[fps] = await self.generator.describe.remote(fps)
        info, needed = self.engines[fps]
        encoding = wire.resolve_encoding(asked, header.get("host"), self.host)
        state = StreamState(next(self.streams), fps, encoding, header["idle"],
                            info.name, info.tiers, wire.needed_from_table(needed))  # fmt: skip
        stream = self.joinable[state.stream] = Stream(state)
        await _send(ws, self._ready(stream))
        return stream

    def _joined(self, join: object) -> Stream | None:
        """The stream a hello's "join" names, if its key is right; None without one."""
        if join is None:
            return None
        if not isinstance(join, dict):
            raise wire.ProtocolError('"join" must be an object')
        stream = self.joinable.get(wire.field(join, "stream", int))
        key = wire.field(join, "key", str)
        if stream is None or not hmac.compare_digest(key.encode(), stream.key.encode()):
            raise wire.ProtocolError("no such stream to join (it ended, or the key is wrong)")
        return stream

    def _ready(self, stream: Stream) -> dict:
        state = stream.state
        info, needed = self.engines[state.fps]
        return {"type": "ready", "version": wire.VERSION, "stream": state.stream,
                "engine": info.name, "tiers": list(info.tiers),
                "batch_sizes": list(info.batch_sizes), "response_s": info.response_s,
                "needed": needed, "key": stream.key, "encoding": state.encoding}  # fmt: skip

    async def _handle(self, ws: WebSocket, stream: Stream, header: dict, payload: bytes):
        state, kind = stream.state, header["type"]
        if kind == "audio":
            state.add_audio(wire.field(header, "start", int), payload)
        elif kind == "avatar":
            await self._avatar(ws, wire.field(header, "sha256", str), payload)
        elif kind == "frames":
            if payload:  # the audio these frames need, sent along
                state.add_audio(wire.field(header, "audio_start", int), payload)
            await self._frames(ws, stream, header)
        else:
            raise wire.ProtocolError(f"unknown message type {kind!r}")

    async def _avatar(self, ws: WebSocket, sha: str, payload: bytes) -> None:
        if payload and sha not in self.avatars:
            wire.avatar_from_blob(payload, sha)  # checked here, before any replica sees it
            self.avatars[sha] = ray.put(payload)
            while len(self.avatars) > UPLOADED_AVATARS:
                self.avatars.popitem(last=False)
        known = sha in self.avatars
        if known:
            self.avatars.move_to_end(sha)
        await _send(ws, {"type": "avatar", "sha256": sha, "known": known})

    async def _frames(self, ws: WebSocket, stream: Stream, header: dict) -> None:
        t0, state = time.perf_counter(), stream.state
        request_id = wire.field(header, "id", int)
        frames = wire.frame_list(header)
        tier = wire.field(header, "tier", str)
        if tier not in state.tiers:
            raise wire.ProtocolError(f"tier must be one of {state.tiers}")
        avatar = wire.field(header, "avatar", str)
        if avatar not in self.avatars:
            raise wire.ProtocolError("send the avatar before asking for its frames")
        key = (tuple(frames), avatar, tier)
        if request_id in stream.calls:  # the copy from the stream's other connection
            asked, call = stream.calls[request_id]
            if asked != key:
                raise wire.ProtocolError(f"request {request_id} asked for other frames before")
        else:
            conditions = tuple(state.conditions(frames))
            start, audio = state.window(frames)
            request = RenderRequest(state.stream, avatar, tuple(frames), conditions, tier,
                                    state.fps, state.idle, start, audio, time.time(),
                                    wire.wait_seconds(header))  # fmt: skip
            call = asyncio.ensure_future(self._generate(request, self.avatars[avatar]))
            stream.calls[request_id] = (key, call)
            while len(stream.calls) > KEPT_CALLS:
                stream.calls.popitem(last=False)
        result = await asyncio.shield(call)
        if result.stream != state.stream or result.frames != tuple(frames):
            raise RuntimeError("a generator answered another request")  # never sent on
        reply = {
            "type": "faces",
            "id": request_id,
            "stream": state.stream,
            "avatar": avatar,
            "frames": frames,
            "tier": tier,
            "encoding": state.encoding,
            "queue": self.in_flight,
            "batch_streams": result.batch_streams,
            "batch_frames": result.batch_frames,
            "generate_ms": result.seconds * 1e3,
            "late": result.late,  # no faces: it queued past the client's wait
        }
        index, blobs = [], []
        for i, patches in enumerate(result.patches):
            for x, y, patch in patches:
                blobs.append(wire.encode_patch(patch, state.encoding))
                index.append([i, x, y, patch.shape[1], patch.shape[0], len(blobs[-1])])
        reply["patches"] = index
        reply["server_ms"] = (time.perf_counter() - t0) * 1e3
        await ws.send_bytes(wire.pack(reply, b"".join(blobs)))

    async def _generate(self, request: RenderRequest, avatar_ref: Any) -> RenderResult:
        """One generator call; retried on another replica if its replica died. It goes by
        value without the avatar, and again by reference with it where the replica had
        not prepared that avatar (its first call there)."""
        deadline = time.monotonic() + RETRY_FOR_S
        self.in_flight += 1
        try:
            while True:
                try:
                    result = await self.by_value.render.remote((request, []))
                    if result is None:
                        result = await self.generator.render.remote((request, [avatar_ref]))
                    if result is None:  # preparing the others in its batch dropped it again
                        raise MissingAvatar(request.avatar)
                    self.counters.count(len(result.patches), result.late, result.batch_streams,
                                        result.seconds)  # fmt: skip
                    return result
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("generator call failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(0.05)
        finally:
            self.in_flight -= 1


# -- running it -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    token_file: Path
    engine: str = "lite"
    replicas: int | None = None  # None: default_replicas
    host: str = "127.0.0.1"
    port: int = 8765
    models_dir: Path | None = None
    address: str | None = None
    random_weights: str | None = None  # "full" | "tiny": musetalk benchmarks, no weight files
    status_every_s: float = 10.0  # 0: no status lines


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise EngineError(
            f"remote generation runs the {', '.join(ENGINES)} engine; {engine!r} is not served yet"
        )


def default_replicas(cluster: dict[str, float], engine: str) -> int:
    """musetalk: one replica per GPU of the cluster (else one, on the CPU); lite: one."""
    return max(1, int(cluster.get("GPU", 0))) if engine == "musetalk" else 1


def follows_gpus(cluster: dict[str, float], engine: str, replicas: int | None) -> bool:
    """Whether the pool keeps one replica per GPU as the cluster changes: musetalk on GPUs,
    where --replicas did not fix the count."""
    return engine == "musetalk" and replicas is None and cluster.get("GPU", 0) >= 1


def replica_resources(cluster: dict[str, float], replicas: int) -> dict[str, float]:
    """A generator replica's share of the cluster: a GPU each where there are enough, else an
    equal share of one (two replicas on one GPU: one's kernels run while the other works on
    the CPU), and a CPU each, or a share, so that every replica can be placed."""
    share = {"num_cpus": min(1.0, cluster.get("CPU", 1.0) / replicas)}
    gpus = int(cluster.get("GPU", 0))
    if gpus >= 1:
        share["num_gpus"] = 1.0 / math.ceil(replicas / gpus)  # whole shares of one GPU
    return share


def build_app(
    engine: str,
    replicas: int,
    token: str,
    models_dir: Path | None = None,
    random_weights: str | None = None,
    per_gpu: bool = False,
) -> Any:
    """The Serve application: ingress bound to a generator pool of `replicas` (per_gpu: to
    start with, then one per GPU of the cluster as machines join and leave)."""
    check_engine(engine)
    actor: dict[str, Any] = replica_resources(ray.cluster_resources(), replicas)
    actor["runtime_env"] = {"env_vars": GRPC_ENV}
    size = {"autoscaling_config": follow_gpus(replicas)} if per_gpu else {"num_replicas": replicas}
    generator = Generator.options(**size, ray_actor_options=actor)
    # one ingress either way; "autoscaled" to one beside an autoscaled generator, or Serve
    # warns at each deploy and shutdown that it cannot deregister its autoscaling state
    ingress = Ingress.options(autoscaling_config=ONE) if per_gpu else Ingress
    return ingress.bind(
        generator.bind(engine, models_dir, random_weights),
        hashlib.sha256(token.encode()).hexdigest(),
    )


def start_app(
    engine: str,
    replicas: int,
    token: str,
    host: str,
    port: int,
    models_dir: Path | None = None,
    name: str = APP_NAME,
    route: str = "/",
    random_weights: str | None = None,
    per_gpu: bool = False,
) -> str:
    """Deploy on the connected Ray cluster; returns the stream URL."""
    serve.start(
        http_options={"host": host, "port": port},
        logging_config=QUIET,
    )
    listening = serve_address()
    if listening is not None and listening != (host, port):  # it ran there before: kept its
        raise EngineError(
            f"Ray Serve already runs on this cluster, listening on {listening[0]}:{listening[1]}"
            f" (not {host}:{port}): run with --host {listening[0]} --port {listening[1]}, or "
            "shut it down there first (`serve shutdown`)"
        )
    if name in serve.status().applications:  # serve.run would replace it without a word
        raise EngineError(
            f"another livecam serve runs on this cluster (Serve application {name!r}): "
            "its clients would lose it; stop it first"
        )
    app = build_app(engine, replicas, token, models_dir, random_weights, per_gpu)
    try:
        serve.run(app, name=name, route_prefix=route)
    except RuntimeError as exc:  # Serve's "failed to update the deployments", without the cause
        raise DeployFailed(f"the pool did not start: {deploy_failure(name) or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"ws://{shown}:{port}{route.rstrip('/')}"


class DeployFailed(EngineError):
    """The application was deployed and its replicas failed to start (it is still there)."""


def deploy_failure(name: str) -> str | None:
    """Why a deployment of application `name` failed: the last line of its replicas' error
    (livecam's own errors without their module path), or None where Serve kept none."""
    app = serve.status().applications.get(name)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    lines = [line.strip() for line in "\n".join(messages).splitlines() if line.strip()]
    if not lines:
        return None
    kind, sep, text = lines[-1].partition(": ")
    return text if sep and kind.startswith("livecam.") else lines[-1]


def serve_address() -> tuple[str, int] | None:
    """Where Ray Serve on the connected cluster listens (None: it does not run there)."""
    from ray.serve.context import _get_global_client  # Serve's own record (no public API)

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return client.http_config.host, client.http_config.port


def run_server(opts: ServeOptions, say: Any = print) -> int:
    """Runs until Ctrl-C or SIGTERM, then shuts Serve (and a local cluster) down."""
    if opts.replicas is not None and opts.replicas < 1:
        raise EngineError("--replicas must be at least 1")
    check_engine(opts.engine)
    token = read_token(opts.token_file, create=True)
    if opts.engine == "musetalk" and not opts.random_weights and not opts.address:
        check_weights(opts.models_dir)  # (on a cluster, the replicas' machines have them)
    if not opts.address:
        check_port(opts.host, opts.port)
        # a cluster of its own, even where `ray start` runs one (--address joins that)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
                 logging_level="warning")  # fmt: skip
    else:
        join_cluster(opts.address)
    cluster = ray.cluster_resources()
    replicas = opts.replicas or default_replicas(cluster, opts.engine)
    per_gpu = follows_gpus(cluster, opts.engine, opts.replicas)
    serve_was_there = serve_address() is not None
    notifier = Notifier()
    stop, up = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not up.is_set():  # deploying: perhaps for resources that never come
            raise KeyboardInterrupt

    # after ray.init, which installs its own SIGTERM handler
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = start_app(opts.engine, replicas, token, opts.host, opts.port,
                            opts.models_dir, random_weights=opts.random_weights,
                            per_gpu=per_gpu)  # fmt: skip
        except KeyboardInterrupt:
            say("livecam serve: stopped before the pool was up")
            remove_app(serve_was_there)
            return 130
        except DeployFailed:
            remove_app(serve_was_there)
            raise
        up.set()
        weights = f" ({opts.random_weights}-size random weights)" if opts.random_weights else ""
        per = " (one per GPU, as GPU machines join and leave)" if per_gpu else ""
        pool = f"{opts.engine}{weights} x{replicas}{per} at {url}"
        say(f"livecam serve: {pool} (clients: livecam start --remote {url} --token-file FILE)")
        notifier.ready(pool)  # under systemd (Type=notify): up, and where

        def tell(line: str) -> None:
            say(line)
            notifier.status(line.removeprefix("livecam serve: "))

        ingress = serve.get_app_handle(APP_NAME)
        report_status(stop, opts.status_every_s, lambda: _pool_stats(ingress), tell)
        say("livecam serve: shutting down")
        notifier.stopping()
        remove_app(serve_was_there)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
        notifier.close()
    return 0


def _pool_stats(ingress: Any) -> dict | None:
    """The ingress's counts and the generator replicas running; None where the ingress does
    not answer (a replica restarting)."""
    try:
        stats = ingress.stats.remote().result(timeout_s=STATUS_TIMEOUT_S)
        app = serve.status().applications.get(APP_NAME)
    except Exception as exc:
        log.warning("no pool status: %s", type(exc).__name__)
        return None
    generator = app.deployments.get(Generator.name) if app else None
    states = generator.replica_states if generator else {}
    return {**stats, "replicas": states.get("RUNNING", 0)}


def join_cluster(address: str) -> None:
    """ray.init on an existing cluster; EngineError, saying what to do, where that fails."""
    host, _, port = address.rpartition(":")
    if "://" not in address and host and port.isdigit():  # HOST:PORT: Ray retries for minutes
        try:
            socket.create_connection((host.strip("[]"), int(port)), JOIN_CHECK_S).close()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else "no answer"
            raise EngineError(
                f"cannot join the Ray cluster at {address}: {reason} "
                "(is `ray start --head` running there, and is the address its GCS port?)"
            ) from None
    try:
        ray.init(address=address, logging_level="warning")
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError
        causes, cause = [], exc
        while cause is not None and len(causes) < 8:  # Ray wraps the GCS client's error
            causes.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        if any("InvalidAuthToken" in text or "AuthenticationError" in text for text in causes):
            raise EngineError(
                f"the Ray cluster at {address} asks for its token: run with RAY_AUTH_MODE=token "
                "and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(`ray get-auth-token` on its head node prints it)"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(
            f"cannot join the Ray cluster at {address}: {first} "
            "(is `ray start --head` running there, and is the address its GCS port?)"
        ) from None


def remove_app(serve_was_there: bool) -> None:
    """The application off the cluster, and Serve too where this run started it and no other
    application came meanwhile (a Serve left running keeps its address for the next run)."""
    serve.delete(APP_NAME)
    if not serve_was_there and not serve.status().applications:
        serve.shutdown()


def check_weights(models_dir: Path | None) -> None:
    """EngineError, before Ray starts, where the replicas would find no weights here."""
    from livecam.engines.musetalk.manifest import default_models_dir, missing_weights

    if missing := missing_weights(models_dir or default_models_dir()):
        raise EngineError(missing)


def check_port(host: str, port: int) -> None:
    """EngineError if the address cannot be listened on (Serve's proxy would fail quietly)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise EngineError(
            f"cannot listen on {host}:{port}: {reason} "
            "(another livecam serve? choose another --port)"
        ) from None
