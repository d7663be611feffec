"""A TCP relay that makes loopback behave like a slow, lossy network.

netem needs the sch_netem kernel module, which this kind of machine does not have; TCP hides
loss as a retransmission delay anyway, so the relay holds each chunk for `delay` +- `jitter`
in each direction (in order) and a share `loss` of chunks for an extra retransmission
timeout `rto` (Linux's minimum is 200 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.05, jitter: float = 0.01,
                 loss: float = 0.01, rto: float = 0.2, seed: int = 0) -> None:  # fmt: skip
        self.target_port = target_port
        self.delay, self.jitter, self.loss, self.rto = delay, jitter, loss, rto
        self.random = random.Random(seed)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)  # fmt: skip

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                at, data = await queue.get()
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        last = 0.0
        try:
            while data := await reader.read(65536):
                hold = self.delay + self.random.uniform(-self.jitter, self.jitter)
                if self.random.random() < self.loss:
                    hold += self.rto
                last = max(last, time.monotonic() + hold)  # TCP keeps the order
                queue.put_nowait((last, data))
        finally:
            queue.put_nowait((last, b""))
            with contextlib.suppress(Exception):
                await sender
