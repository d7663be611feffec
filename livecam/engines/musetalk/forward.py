"""The UNet + decoder forward in fixed batch shapes, with the GPU fast paths.

One call: (B, 8, 32, 32) avatar latents + (B, 50, D) audio features -> (B, 256, 256, 3) uint8
BGR faces, still on the device. On CUDA each (tier, batch) shape is captured once as a CUDA
graph: a replay launches the ~1,000 kernels of the UNet and the decoder without Python or
launch gaps, which is what bounds small live batches (batch 1 is launch-bound, not
FLOP-bound). channels_last runs the convolutions in NHWC, the tensor cores' layout.
torch.compile (opt-in) fuses the decoders' elementwise passes: on an H200 at batch 16, the
full VAE decoder's GroupNorm and SiLU passes took 33 of its 56 ms eagerly, and the compiled
decoder 24 ms (13.7 s to compile that shape). Only the batch dimension is dynamic: one compile
for batch 1 and one per range of batches the decoder's code branches on (the full VAE: 2-15,
16-63, 64 up), where a compile per shape made the merged shapes cost minutes (here, the toy
decoder on a CPU: 25 s a shape; now 30 s for a range, under 1 s for each shape within it).
The UNet is not compiled: compiling it for a dynamic batch ran past four minutes there.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from livecam.engines.musetalk.models import MuseTalkModels
from livecam.features.whisper import WINDOW_STEPS

log = logging.getLogger(__name__)

WARMUP_RUNS = 3  # eager runs on a side stream before a capture (cuDNN/cuBLAS pick kernels)
# Batches merged from several streams (their calls mostly 4 frames each) come in steps of 4
# frames up to 32, then 8: padding one adds at most 3 (7) frames. Powers of two padded five
# streams' 20 frames to 32, 60 % more work for the GPU than the frames asked for.
MERGED_SIZES = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)


@dataclass(frozen=True)
class FastPaths:
    """The engine's speed-ups; each can be switched off (the GPU suite measures each)."""

    cuda_graphs: bool = True  # replay each (tier, batch) shape as one captured graph (CUDA)
    channels_last: bool = True  # NHWC convolutions
    gpu_blend: bool = True  # resize and blend the face on the device; only the box comes back
    pinned: bool = True  # page-locked host buffers and non_blocking copies (CUDA)
    compile: bool = False  # torch.compile the decoders (CUDA; opt-in: each shape compiles once)

    @classmethod
    def configured(cls) -> FastPaths:
        """The defaults, with compile as LIVECAM_TORCH_COMPILE=1 asks."""
        return cls(compile=os.environ.get("LIVECAM_TORCH_COMPILE") == "1")

    @classmethod
    def none(cls) -> FastPaths:
        return cls(cuda_graphs=False, channels_last=False, gpu_blend=False, pinned=False,
                   compile=False)  # fmt: skip


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    latents: torch.Tensor  # static inputs, copied into before each replay
    cond: torch.Tensor
    out: torch.Tensor  # static output, valid until the next replay


# Two decoders, two functions: dynamo keeps one cache per function (a few compiles each).
def _decode_full(decoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return decoder.decode(x).sample


def _decode_tiny(decoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return decoder.decode(x).sample


PLAIN_DECODERS: dict[str, Callable] = {"full": _decode_full, "tiny": _decode_tiny}
_compiled: dict[str, Callable] = {}
_compile_lock = threading.Lock()


def compiled_decoder(tier: str) -> Callable:
    """The tier's decode, compiled once per process (`Forward.decode` marks the batch
    dimension dynamic): dynamo keys its code on the module passed in, so every Forward over
    the same models shares the compilations."""
    with _compile_lock:
        if tier not in _compiled:
            _compiled[tier] = torch.compile(PLAIN_DECODERS[tier])
        return _compiled[tier]


def to_bgr_uint8(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] -> (B, H, W, 3) uint8 BGR."""
    image = ((image.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return image.permute(0, 2, 3, 1).flip(-1)


class Forward:
    """UNet + decoder for one model set; shared by every engine (avatar, stream) using it."""

    def __init__(
        self,
        models: MuseTalkModels,
        paths: FastPaths,
        sizes: tuple[int, ...] = (1, 2, 4, 8),
        compile_on_cpu: bool = False,
    ) -> None:
        """`sizes`: the batch shapes where shapes are fixed (CUDA graphs, compiled decoders);
        a call runs in chunks of at most the largest. `compile_on_cpu`: compile on a CPU too
        (tests; a CPU gains little for its minutes of compiling, so the fast path is CUDA's
        alone otherwise)."""
        self.models, self.sizes = models, sizes
        self.device, self.dtype = models.device, models.dtype
        self.use_graphs = paths.cuda_graphs and self.device.type == "cuda"
        use_compile = paths.compile and (self.device.type == "cuda" or compile_on_cpu)
        self._decoders = (
            {tier: compiled_decoder(tier) for tier in PLAIN_DECODERS}
            if use_compile
            else PLAIN_DECODERS
        )
        self.compile_error: str | None = None  # why compiling failed (then it runs eagerly)
        self.format = torch.channels_last if paths.channels_last else torch.contiguous_format
        for net in (models.unet, models.vae, models.taesd):
            if net is not None:
                net.to(memory_format=self.format)
        self._t0 = torch.zeros((), dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[str, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._lock = threading.Lock()  # graphs have one set of static buffers
        self.graph_error: str | None = None  # why capturing failed (then it runs eagerly)

    def _decoder(self, tier: str) -> torch.nn.Module:
        return self.models.taesd if tier == "tiny" else self.models.vae

    def unet(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, 8, 32, 32) latents, (B, 50, D) conditioning -> (B, 4, 32, 32), outside any
        captured graph."""
        x = latents.contiguous(memory_format=self.format)
        return self.models.unet(x, self._t0, encoder_hidden_states=cond).sample

    def decode(self, latents: torch.Tensor, tier: str) -> torch.Tensor:
        """(B, 4, 32, 32) -> (B, 256, 256, 3) uint8 BGR, outside any captured graph."""
        vae = self._decoder(tier)
        x = latents.contiguous(memory_format=self.format) / float(vae.config.scaling_factor)
        decode = self._decoders[tier]
        if decode is not PLAIN_DECODERS[tier] and len(x) > 1:
            torch._dynamo.mark_dynamic(x, 0)  # one compile serves a range of batch sizes
        try:
            return to_bgr_uint8(decode(vae, x))
        except Exception as e:
            if decode is PLAIN_DECODERS[tier]:
                raise
            # a compiler that fails (no C compiler for triton, an unsupported op) costs
            # speed, not the camera: the plain decoders take over
            self._decoders = PLAIN_DECODERS
            self.compile_error = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("torch.compile off (compiling failed): %s", self.compile_error)
            return to_bgr_uint8(PLAIN_DECODERS[tier](vae, x))

    def _eager(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> torch.Tensor:
        return self.decode(self.unet(latents, cond), tier)

    def _capture(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> _Graph:
        static_x, static_c = latents.clone(), cond.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._eager(static_x, static_c, tier)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager(static_x, static_c, tier)
        return _Graph(graph, static_x, static_c, out)

    @property
    def fixed_shapes(self) -> bool:
        """Whether each batch shape is captured or compiled: then a call is padded to one of
        `sizes`. Elsewhere it runs as it is, since padding would be work for nothing."""
        return self.use_graphs or self._decoders is not PLAIN_DECODERS

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> torch.Tensor:
        """(B, 8, 32, 32) latents, (B, 50, D) conditioning in the model dtype, any B ->
        (B, 256, 256, 3) uint8 BGR on the device (a fresh tensor: graphs reuse their output
        buffer), in chunks of at most the largest of `sizes`."""
        top = self.sizes[-1]
        out = [self._chunk(latents[i : i + top], cond[i : i + top], tier)
               for i in range(0, len(latents), top)]  # fmt: skip
        return out[0] if len(out) == 1 else torch.cat(out)

    def _chunk(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> torch.Tensor:
        n = len(latents)
        if self.fixed_shapes:  # the last frame repeated up to a captured or compiled shape
            size = next(s for s in self.sizes if s >= n)
            latents, cond = pad_rows(latents, size), pad_rows(cond, size)
        if not self.use_graphs:
            return self._eager(latents, cond, tier)[:n]
        key = (tier, len(latents))
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    graph = self._graphs[key] = self._capture(latents, cond, tier)
                except RuntimeError as e:  # a model op that cannot be captured: stay eager
                    self.use_graphs, self.graph_error = False, f"{type(e).__name__}: {e}"
                    log.warning("CUDA graphs off (capture failed): %s", e)
                    return self._eager(latents, cond, tier)[:n]
            graph.latents.copy_(latents)
            graph.cond.copy_(cond)
            graph.graph.replay()
            return graph.out[:n].clone()


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with its last row repeated up to `size` rows."""
    if len(x) >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])


def warm_shapes(
    forward: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    models: MuseTalkModels,
    tiers: Sequence[str],
    sizes: Sequence[int],
) -> None:
    """Runs (on CUDA: captures) each tier's batch shapes on zero inputs, so none is new
    while live."""
    steps = WINDOW_STEPS * 5
    for tier in tiers:
        for size in sizes:
            latents = torch.zeros((size, 8, 32, 32), dtype=models.dtype, device=models.device)
            cond = torch.zeros((size, steps, models.whisper.dim), dtype=models.dtype,
                               device=models.device)  # fmt: skip
            forward(latents, cond, tier)
    if models.device.type == "cuda":
        torch.cuda.synchronize(models.device)


@dataclass
class _Request:
    latents: torch.Tensor
    cond: torch.Tensor
    tier: str
    done: threading.Event
    out: torch.Tensor | None = None
    error: BaseException | None = None


class SharedForward:
    """One Forward for several streams: calls that arrive while a batch runs are merged into
    the next one (per tier), so N streams of 4 frames make one batch of 4N instead of N
    small ones. A call waits for at most the batch running when it arrived.

    On CUDA a forward only queues work, so "while a batch runs" means the GPU's time, not the
    launch's: the server keeps at most two batches queued on the device (one running, the
    next launched behind it) and gathers the calls that arrive meanwhile into the third.
    Without that wait every call was launched alone the moment it arrived (measured on an
    H200: merged batches of 4 frames, never more, for any number of streams).
    """

    def __init__(self, forward: Forward):
        """`forward`'s sizes are the merged batches' shapes; a batch is at most its largest."""
        self.forward = forward
        self._on_cuda = forward.device.type == "cuda"
        self._pending: list[_Request] = []
        self._wake = threading.Condition()
        self.batches: deque[int] = deque(maxlen=1000)  # frames per merged batch (reports)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="shared-forward", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Ends the serving thread once the pending calls are served, so the Forward and its
        captured graphs can be freed; later calls are refused."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    @property
    def graph_error(self) -> str | None:
        return self.forward.graph_error

    @property
    def compile_error(self) -> str | None:
        return self.forward.compile_error

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, tier: str) -> torch.Tensor:
        request = _Request(latents, cond, tier, threading.Event())
        with self._wake:
            if self._closed:
                raise RuntimeError("this shared forward is closed")
            self._pending.append(request)
            self._wake.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.out is not None
        return request.out

    def _take(self) -> list[_Request]:
        with self._wake:
            self._wake.wait_for(lambda: bool(self._pending) or self._closed)
            if not self._pending:
                return []  # closed
            first = self._pending[0]
            tier, room, taken = first.tier, self.forward.sizes[-1], []
            for request in list(self._pending):  # the first always: a long one is chunked
                if request.tier == tier and (request is first or len(request.latents) <= room):
                    taken.append(request)
                    self._pending.remove(request)
                    room -= len(request.latents)
            return taken

    @torch.inference_mode()
    def _serve(self) -> None:
        queued: deque[torch.cuda.Event] = deque()  # batches launched on the GPU, oldest first
        while taken := self._take():
            try:
                self._run(taken)
            except Exception as e:  # handed to the callers: the serving thread stays up
                for request in taken:
                    request.error = e
            for request in taken:
                request.done.set()
            if self._on_cuda:
                queued.append(torch.cuda.Event())
                queued[-1].record()
                if len(queued) == 2:  # gather calls while the older batch runs
                    queued.popleft().synchronize()

    def _run(self, taken: list[_Request]) -> None:
        latents = torch.cat([r.latents for r in taken])
        cond = torch.cat([r.cond for r in taken])
        out = self.forward(latents, cond, taken[0].tier)
        self.batches.append(len(latents))
        parts = out.split([len(r.latents) for r in taken])
        for request, part in zip(taken, parts, strict=True):
            request.out = part
