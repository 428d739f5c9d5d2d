"""The coalescing producer of one queue.

``send()`` puts a group of encoded envelopes into a bounded buffer and waits for
its confirmation. One flusher task sends everything buffered as one publish-script
call, then resolves each caller's future. When idle, the first call goes out at
once; while a call is in flight, new sends gather for the next one.

Each batch carries this producer's id and a sequence number. If the reply is lost
(connection severed, timeout) the same batch is sent again with the same number,
and the script drops it if it was already applied: a retry never duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

import anyio

from .client import Client
from .errors import TRANSIENT, AioredmqError, ClosedError, PublishUnconfirmedError
from .keys import QueueKeys
from .scripts import script

__all__ = ("Producer",)

log = logging.getLogger("aioredmq.producer")

_SEQ_TTL_MS = 24 * 3600 * 1000
_RETRY_DELAYS_S = (0.05, 0.25, 1.0, 2.0)
_Group = tuple[list[bytes], "asyncio.Future[None]"]


class Producer:
    """Batches the envelopes of one queue into publish-script calls."""

    def __init__(
        self,
        client: Client,
        keys: QueueKeys,
        *,
        max_buffered: int,
        max_batch: int = 2000,
        max_batch_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._client = client
        self._keys = keys
        self.max_buffered = max_buffered
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._producer_key = keys.producer(os.urandom(8).hex())
        self._seq = 0
        self._buf: deque[_Group] = deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._closed = False

    async def send(self, envelopes: list[bytes]) -> None:
        """Append envelopes (at most ``max_batch``) and wait until Redis has them."""
        await (await self.submit(envelopes))

    async def submit(self, envelopes: list[bytes]) -> asyncio.Future[None]:
        """Append envelopes (at most ``max_batch``) once there is room; the future resolves
        when Redis has them. Waiting only for room lets a caller keep several in flight."""
        if self._closed:
            raise ClosedError("the producer is closed; publish before closing the client")
        while self._buffered and self._buffered + len(envelopes) > self.max_buffered:
            self._space.clear()
            await self._space.wait()
            if self._closed:
                raise ClosedError("the producer closed while waiting for buffer space")
        if not self._started:
            self._started = True
            self._client.start_background(self._flush_loop(), name=f"aioredmq-producer-{self._keys.name}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf.append((envelopes, fut))
        self._buffered += len(envelopes)
        self._idle.clear()
        self._wake.set()
        return fut

    def _next_batch(self) -> tuple[list[bytes], list[asyncio.Future[None]]]:
        envs: list[bytes] = []
        futs: list[asyncio.Future[None]] = []
        size = 0
        while self._buf:
            group, fut = self._buf[0]
            if envs and (len(envs) + len(group) > self._max_batch or size > self._max_batch_bytes):
                break
            self._buf.popleft()
            envs.extend(group)
            futs.append(fut)
            size += sum(map(len, group))
        self._buffered -= len(envs)
        self._space.set()
        return envs, futs

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                envs, futs = self._next_batch()
                error: BaseException | None = None
                try:
                    with anyio.CancelScope(shield=True):
                        await self._send_batch(envs)
                except Exception as exc:  # every caller must hear of it, whatever it is
                    if not isinstance(exc, AioredmqError):
                        log.exception("unexpected error publishing to %s", self._keys.name)
                    error = exc
                for fut in futs:
                    if not fut.done():
                        if error is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(error)
            self._idle.set()

    async def _send_batch(self, envs: list[bytes]) -> None:
        self._seq += 1
        publish = script("publish")
        keys = (self._keys.ready, self._producer_key)
        args = (self._seq, _SEQ_TTL_MS, *envs)
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                applied = await publish(self._client.redis, keys, args)
            except TRANSIENT as exc:
                if delay is None:
                    raise PublishUnconfirmedError(
                        f"{len(envs)} message(s) to {self._keys.name!r} were sent but not "
                        f"confirmed after {attempt + 1} tries; they may or may not be queued "
                        f"(consumers deduplicate by message id): {exc}"
                    ) from exc
                log.warning(
                    "publish to %s unconfirmed (%s); resending batch %d in %.2fs",
                    self._keys.name,
                    exc,
                    self._seq,
                    delay,
                )
                await anyio.sleep(delay)
                continue
            if applied == -1:
                log.info("batch %d to %s was already applied; retry dropped", self._seq, self._keys.name)
            return

    async def aclose(self) -> None:
        """Send what is buffered, then refuse new sends."""
        if self._closed:
            return
        self._closed = True
        self._space.set()
        if self._started:
            await self._idle.wait()
