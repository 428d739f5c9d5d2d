"""The coalescing producer of one queue or stream, and the publish API both share.

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
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import anyio

from .client import Client
from .codecs import Codec, get_codec
from .commands import pipeline, resent_once
from .config import RetryPolicy, check_positive
from .delayed import due_spec
from .envelope import encode, encode_many
from .errors import (
    TRANSIENT,
    AioredmqError,
    ClosedError,
    ConfigError,
    ConnectError,
    MessageTooLargeError,
    NotReplicatedError,
    OutOfMemoryError,
    PublishNotSentError,
    PublishUnconfirmedError,
)
from .ids import new_ids, stamped_id
from .keys import _Keys, check_name
from .scripts import script
from .typed import typed_codec

__all__ = ("Producer", "Publishing", "check_encoded")

T = TypeVar("T")

log = logging.getLogger("aioredmq.producer")

_SEQ_TTL_MS = 24 * 3600 * 1000
_MESSAGE_ID = re.compile(r"^[0-9a-f]{1,64}$")
# Resends back off from 50 ms to 0.5 s, 3.25 s in all: longer than a failover with 1 s
# timeouts takes, and never idle over 0.5 s, so a batch resends soon after the new master
# takes writes (the batches behind it wait).
_RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, *(0.5,) * 5)
Wait = tuple[int, int]
"""Replicas that must acknowledge a batch, and for how long to wait for them (ms)."""
_Group = tuple[list[bytes], "asyncio.Future[None]", Wait | None]


class Producer:
    """Batches the envelopes of one queue or stream into publish-script calls.

    The script takes ``(target, sequence record, *extra_keys)`` as KEYS and
    ``(sequence, record lifetime, *extra_args, *envelopes)`` as ARGV, and replies the
    number appended (-1: applied before), or that and the number a cap dropped.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        script_name: str,
        target: str,
        producer_key: str,
        extra_keys: tuple[str, ...] = (),
        extra_args: tuple[Any, ...] = (),
        max_buffered: int,
        max_batch: int = 2000,
        max_batch_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._client = client
        self._name = name
        self._script = script(script_name)
        self._keys = (target, producer_key, *extra_keys)
        self._extra_args = extra_args
        self.max_buffered = max_buffered
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._seq = 0
        self._buf: deque[_Group] = deque()
        self._deadline = math.inf  # set by a close that must end in time
        self._sending: anyio.CancelScope | None = None
        self.unconfirmed_at_close: tuple[str, ...] = ()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._outage_since: float | None = None  # when sends began to fail (logged once)
        self._loop: asyncio.AbstractEventLoop | None = None  # set when the flusher starts

    async def send(self, envelopes: list[bytes], wait: Wait | None = None) -> None:
        """Append envelopes (at most ``max_batch``) and wait until Redis has them (and,
        with ``wait``, that many replicas)."""
        fut = self._offer(envelopes, wait)
        await (fut if fut is not None else await self.submit(envelopes, wait))

    async def submit(self, envelopes: list[bytes], wait: Wait | None = None) -> asyncio.Future[None]:
        """Append envelopes (at most ``max_batch``) once there is room; the future resolves
        when Redis has them. Waiting only for room lets a caller keep several in flight."""
        while (fut := self._offer(envelopes, wait)) is None:
            self._space.clear()
            await self._space.wait()
        return fut

    def _offer(self, envelopes: list[bytes], wait: Wait | None = None) -> asyncio.Future[None] | None:
        """Buffer envelopes if there is room (``None`` if not); the future resolves when
        Redis has them."""
        if self._closed:
            raise ClosedError("the producer is closed; publish before closing the client")
        buffered = self._buffered
        if buffered and buffered + len(envelopes) > self.max_buffered:
            return None
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
            self._client.start_background(self._flush_loop(), name=f"aioredmq-producer-{self._name}")
        fut: asyncio.Future[None] = loop.create_future()
        self._buf.append((envelopes, fut, wait))
        self._buffered = buffered + len(envelopes)
        if not buffered:  # the first in the buffer wakes the flusher; the rest find it awake
            self._idle.clear()
            self._wake.set()
        return fut

    def _next_batch(self) -> tuple[list[bytes], list[asyncio.Future[None]], Wait | None]:
        """The next batch: the first caller in line and every other waiting caller that asked
        for the same durability (replicas and timeout), in the order they came. Each
        caller's outcome follows its own request: a plain publish never waits for, or fails
        with, replicas another caller asked for. Callers of one level keep their order."""
        envs: list[bytes] = []
        futs: list[asyncio.Future[None]] = []
        size = 0
        buf = self._buf
        batch_wait = buf[0][2]
        others: list[_Group] = []
        while buf:
            group, fut, wait = buf[0]
            if envs and (len(envs) + len(group) > self._max_batch or size > self._max_batch_bytes):
                break
            buf.popleft()
            if wait != batch_wait:
                others.append((group, fut, wait))
                continue
            envs.extend(group)
            futs.append(fut)
            size += sum(map(len, group))
        buf.extendleft(reversed(others))
        self._buffered -= len(envs)
        self._space.set()
        return envs, futs, batch_wait

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                envs, futs, wait = self._next_batch()
                error: BaseException | None = None
                try:
                    # Shielded: a cancelled caller's messages are still sent. A close that
                    # runs out of time ends the send (the scope's own deadline).
                    with anyio.CancelScope(shield=True, deadline=self._deadline) as sending:
                        self._sending = sending
                        await self._send_batch(envs, wait)
                    if sending.cancelled_caught:
                        error = self._unconfirmed_at_close(envs)
                except Exception as exc:  # every caller must hear of it, whatever it is
                    if not isinstance(exc, AioredmqError):
                        log.exception("unexpected error publishing to %s", self._name)
                    error = exc
                finally:
                    self._sending = None
                for fut in futs:
                    if not fut.done():
                        if error is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(error)
            self._idle.set()

    async def _send_batch(self, envs: list[bytes], wait: Wait | None = None) -> None:
        self._seq += 1
        args = (self._seq, _SEQ_TTL_MS, *self._extra_args, *envs)
        if not self._client.server_checked:
            await self._client.check_server()
        replicated = 0
        maybe_sent = False  # a try that failed after connecting may have been applied
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                if wait is None:
                    reply = await self._script(self._client.redis, self._keys, args)
                else:
                    reply, replicated = await self._script.call_and_wait(self._client.redis, self._keys, args, *wait)
            except OutOfMemoryError as exc:
                # Refused before anything was written. Waiting would hold the caller while
                # only consumers can free memory: say so now, so the caller can shed load.
                raise OutOfMemoryError(
                    f"{len(envs)} message(s) to {self._name!r} were refused, nothing was queued: {exc}"
                ) from exc
            except TRANSIENT as exc:
                maybe_sent = maybe_sent or not isinstance(exc, ConnectError)
                if delay is None:
                    if not maybe_sent:
                        raise PublishNotSentError(
                            f"{len(envs)} message(s) to {self._name!r} were not sent: {attempt + 1} tries "
                            f"over {sum(_RETRY_DELAYS_S):.0f} s could not connect; publishing again "
                            f"cannot duplicate them ({exc})"
                        ) from exc
                    raise PublishUnconfirmedError(
                        f"{len(envs)} message(s) to {self._name!r} were sent but not "
                        f"confirmed after {attempt + 1} tries; they may or may not be queued "
                        f"(consumers deduplicate by message id): {exc}"
                    ) from exc
                if self._outage_since is None:  # once per outage, not once per try
                    self._outage_since = time.monotonic()
                    log.warning("publish to %s failed (%s); resending with backoff", self._name, exc)
                else:
                    log.debug("publish to %s: resending batch %d in %.2fs (%s)", self._name, self._seq, delay, exc)
                await anyio.sleep(delay)
                continue
            if self._outage_since is not None:
                log.info(
                    "publish to %s works again, after %.1f s of failures",
                    self._name,
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
            applied, dropped = (reply, 0) if isinstance(reply, int) else reply
            if applied == -1:
                log.info("batch %d to %s was already applied; retry dropped", self._seq, self._name)
            if dropped:
                log.warning(
                    "%s: the length or age cap dropped %d entries that some group had not acked", self._name, dropped
                )
            if wait is not None and replicated < wait[0]:
                raise NotReplicatedError(
                    f"{len(envs)} message(s) to {self._name!r} are in Redis, but only {replicated} of {wait[0]} "
                    f"replica(s) acknowledged them within {wait[1]} ms: a failover now could lose them "
                    "(they may also be delivered as usual)",
                    replicated,
                )
            return

    def _unconfirmed_at_close(self, envs: list[bytes]) -> PublishUnconfirmedError:
        ids = tuple(env.split(b" ", 2)[1].decode() for env in envs)
        self.unconfirmed_at_close += ids
        return PublishUnconfirmedError(
            f"{len(ids)} message(s) to {self._name!r} were not confirmed before the close "
            "deadline; they may or may not be queued",
            ids,
        )

    async def aclose(self, deadline: float | None = None) -> None:
        """Send what is buffered, then refuse new sends. By ``deadline`` (anyio's clock) a
        batch still unconfirmed is given up: its callers get PublishUnconfirmedError, and
        its ids are in ``unconfirmed_at_close``."""
        if self._closed:
            return
        self._closed = True
        self._space.set()
        self._deadline = math.inf if deadline is None else deadline
        if self._sending is not None:
            self._sending.deadline = self._deadline
        if self._loop is not None:  # the flusher runs
            await self._idle.wait()


def check_encoded(
    codec: Codec, max_body_bytes: int, where: str, bodies: Iterable[Any], headers: Mapping[str, str] | None
) -> tuple[list[str], list[bytes]]:
    """Ids and envelopes for a batch; checks every one before anything is sent."""
    if headers is not None:
        check_headers(headers)
    encode = codec.encode
    encoded = [encode(body) for body in bodies]
    ids = new_ids(len(encoded))
    raws = encode_many(ids, time.time_ns() // 1_000_000, codec.name, dict(headers) if headers else None, encoded)
    if raws and (largest := max(map(len, raws))) > max_body_bytes:
        raise _too_large(where, largest, max_body_bytes)
    return ids, raws


def refuse_one_body(bodies: object) -> None:
    """``publish_many`` takes many bodies: a str, bytes or mapping would iterate into its
    characters, bytes or keys, which is never what the caller meant."""
    if isinstance(bodies, (str, bytes, bytearray, memoryview, Mapping)):
        raise TypeError(
            f"publish_many takes an iterable of bodies, not one {type(bodies).__name__}: "
            "use publish() for a single body, or put it in a list"
        )


def replica_wait(replicas: int, timeout_s: float) -> Wait | None:
    """What a publish waits for beyond Redis itself: ``replicas`` acknowledgements."""
    check_positive("replicas", replicas, integer=True, zero=True)
    check_positive("replica_timeout_s", timeout_s)
    return (replicas, max(1, int(timeout_s * 1000))) if replicas else None


def check_headers(headers: Mapping[str, str]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise TypeError("headers must map str to str")


def _too_large(where: str, size: int, max_body_bytes: int) -> MessageTooLargeError:
    return MessageTooLargeError(
        f"a message to {where} is {size} bytes encoded, over max_body_bytes="
        f"{max_body_bytes}; nothing was sent. Store large payloads elsewhere and "
        "send a reference, or raise max_body_bytes"
    )


class Publishing(Generic[T]):
    """What a queue and a stream share: their settings, ``publish`` and ``publish_many``."""

    name: str
    codec: Codec
    retry: RetryPolicy
    lease_s: float
    max_body_bytes: int
    client: Client
    producer: Producer
    scheduler: Producer
    """Delayed publishes: into the delayed set, through the ``schedule`` script."""

    def _setup(
        self,
        client: Client,
        name: str,
        keys: _Keys,
        *,
        codec: str | Codec,
        retry: RetryPolicy,
        lease_s: float,
        max_body_bytes: int,
        max_buffered: int,
        body: type[T] | None = None,
    ) -> None:
        check_name("name", name)
        check_positive("lease_s", lease_s)
        check_positive("max_body_bytes", max_body_bytes, integer=True)
        check_positive("max_buffered", max_buffered, integer=True)
        if not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry={retry!r} must be an aioredmq.RetryPolicy")
        self.client = client
        self.name = name
        self.codec = typed_codec(get_codec(codec), body)
        self.retry = retry
        self.lease_s = float(lease_s)
        self.max_body_bytes = max_body_bytes
        self._delayed_keys = (keys.delayed, keys.scheduled)
        self.scheduler = Producer(
            client,
            name,
            script_name="schedule",
            target=keys.delayed,
            producer_key=keys.producer(os.urandom(8).hex()),
            extra_keys=(keys.scheduled,),
            extra_args=(keys.due,),
            max_buffered=max_buffered,
        )

    async def aclose_producers(self, deadline: float | None = None) -> tuple[str, ...]:
        """Send what is buffered, then refuse new publishes; by ``deadline``, give up on
        what is still unconfirmed and return its ids."""
        await self.producer.aclose(deadline)
        await self.scheduler.aclose(deadline)
        return self.producer.unconfirmed_at_close + self.scheduler.unconfirmed_at_close

    def _encode(self, bodies: Iterable[Any], headers: Mapping[str, str] | None) -> tuple[list[str], list[bytes]]:
        return check_encoded(self.codec, self.max_body_bytes, repr(self.name), bodies, headers)

    async def publish(
        self,
        body: T,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        replicas: int = 0,
        replica_timeout_s: float = 1.0,
    ) -> str:
        """Append one message; return its id once Redis has it.

        With ``delay`` (seconds) or ``at`` (a timezone-aware datetime) the message waits
        in the delayed set and is delivered once due; :meth:`cancel` withdraws it until then.
        Concurrent calls share one round trip. With ``replicas``, the call also waits
        (``WAIT``, up to ``replica_timeout_s``) until that many replicas have the message,
        and raises :class:`NotReplicatedError` if fewer did. Raises
        :class:`MessageTooLargeError` before sending anything, :class:`PublishUnconfirmedError`
        when Redis never confirmed (the message may exist), :class:`ClosedError` after close.
        Cancelling the call does not withdraw the message: once buffered, it is sent.
        """
        self.client.check_open()
        wait = replica_wait(replicas, replica_timeout_s)
        if self.client.tracing is not None:
            headers, span = self.client.tracing.publish(self.name, headers, 1)
            with span:
                return await self._publish_one(body, headers, delay, at, wait)
        return await self._publish_one(body, headers, delay, at, wait)

    async def _publish_one(
        self, body: T, headers: Mapping[str, str] | None, delay: float | None, at: datetime | None, wait: Wait | None
    ) -> str:
        if delay is None and at is None:  # the hot path: no list, one clock read
            if headers is not None:
                check_headers(headers)
            codec = self.codec
            message_id, ms = stamped_id()
            raw = encode(message_id, 0, ms, codec.name, dict(headers) if headers else None, codec.encode(body))
            if len(raw) > self.max_body_bytes:
                raise _too_large(repr(self.name), len(raw), self.max_body_bytes)
            await self.producer.send([raw], wait)
        else:
            when = due_spec(delay, at)
            assert when is not None  # delay or at was given
            (message_id,), raws = self._encode((body,), headers)
            await self.scheduler.send([when, raws[0]], wait)
        if self.client.metrics is not None:
            self.client.metrics.published(self.name, 1)
        return message_id

    async def publish_many(
        self,
        bodies: Iterable[T],
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        replicas: int = 0,
        replica_timeout_s: float = 1.0,
    ) -> list[str]:
        """Append many messages in order, in as few round trips as the batch limits allow.

        Every body is encoded and checked before anything is sent. Chunks are buffered as
        room allows, so one is on its way while the next is queued. If an error is raised,
        chunks before the failing one may have been published. ``delay`` / ``at`` apply to
        every message, as for :meth:`publish`, and so do ``replicas`` / ``replica_timeout_s``.
        """
        self.client.check_open()
        refuse_one_body(bodies)
        wait = replica_wait(replicas, replica_timeout_s)
        if self.client.tracing is not None:
            bodies = list(bodies)
            headers, span = self.client.tracing.publish(self.name, headers, len(bodies))
            with span:
                return await self._publish_many(bodies, headers, delay, at, wait)
        return await self._publish_many(bodies, headers, delay, at, wait)

    async def _publish_many(
        self,
        bodies: Iterable[T],
        headers: Mapping[str, str] | None,
        delay: float | None,
        at: datetime | None,
        wait: Wait | None,
    ) -> list[str]:
        when = due_spec(delay, at)
        ids, raws = self._encode(bodies, headers)
        producer = self.producer if when is None else self.scheduler
        if when is not None:
            raws = [item for raw in raws for item in (when, raw)]
        chunk = max(2, min(2000, producer.max_buffered)) // 2 * 2  # never splits a pair
        pending = [await producer.submit(raws[i : i + chunk], wait) for i in range(0, len(raws), chunk)]
        outcomes = await asyncio.gather(*pending, return_exceptions=True)  # every chunk's fate is read
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if self.client.metrics is not None:
            self.client.metrics.published(self.name, len(ids))
        return ids

    @resent_once
    async def cancel(self, message_id: str) -> bool:
        """Withdraw a message waiting in the delayed set (scheduled, or waiting to be
        retried). Returns False if it is not there: already due and moved, or unknown."""
        self.client.check_open()
        if not isinstance(message_id, str) or not _MESSAGE_ID.match(message_id):
            raise ConfigError(f"message_id={message_id!r} is not an aioredmq message id")
        delayed, scheduled = self._delayed_keys
        removed, _ = await pipeline(
            self.client.redis,
            [("ZREM", delayed, message_id), ("HDEL", scheduled, message_id)],
            keys=self._delayed_keys,
            transaction=True,
        )
        return bool(removed)
