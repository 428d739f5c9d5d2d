"""Pub/sub broadcast: every subscriber gets every message published while it listens.

Delivery is at most once. Redis keeps nothing for a subscriber that is not
connected, so a message published while a subscription reconnects is lost; the
next message it delivers then carries ``gap=True``. A subscriber that cannot keep
up is bounded by its ``overflow`` policy: ``"drop_oldest"`` discards the oldest
buffered message (and marks the gap), ``"disconnect"`` ends the subscription with
:class:`SlowSubscriberError`. Memory never grows past ``max_pending`` messages.

One subscription is one connection, held in subscribed mode. Its reader task
reconnects with backoff after any connection loss and subscribes again; a PING
every ``keepalive_s`` finds a link that died without a reset.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

import anyio
import redis.exceptions as rex

from .codecs import Codec, get_codec
from .commands import execute
from .config import check_positive
from .envelope import decode
from .errors import ClosedError, ConfigError, DecodeError, SlowSubscriberError, translate
from .keys import channel_name, check_name
from .producer import check_encoded
from .tasks import Tasks

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .client import Client

__all__ = ("Broadcast", "Channel", "Subscription", "SubscriptionStats")

log = logging.getLogger("aioredmq.channel")
T = TypeVar("T")

Overflow = Literal["drop_oldest", "disconnect"]
_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/:@*?\[\]^]{1,200}$")
_MAX_BACKOFF_S = 2.0


def check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not _PATTERN.match(pattern):
        raise ConfigError(
            f"pattern={pattern!r} is invalid: use channel-name characters and the glob characters '*?[]^'"
        )
    return pattern


@dataclass(frozen=True, slots=True)
class Broadcast(Generic[T]):
    """One message received on a channel."""

    channel: str
    """The channel's name, as given to :meth:`Client.channel` (matters with patterns)."""
    id: str
    body: T
    headers: Mapping[str, str]
    published_at: float
    gap: bool
    """Messages may have been missed just before this one: the subscription reconnected,
    or the overflow policy dropped some. Resynchronise from a durable source if it matters."""


@dataclass(slots=True)
class SubscriptionStats:
    received: int = 0
    dropped: int = 0
    """Discarded by the ``drop_oldest`` policy."""
    undecodable: int = 0
    connection_losses: int = 0
    """Links found broken: reset, closed, or silent past two keepalive intervals."""
    reconnects: int = 0
    gaps: int = 0


class Subscriber:
    """One connection kept subscribed to fixed channels and patterns (wire names).

    Subclasses receive ``_on_message(wire_channel, data)``, ``_on_gap()`` and
    ``_on_resubscribed()``; all run in
    the reader task and must not block.
    """

    def __init__(
        self, client: Client, channels: tuple[str, ...], patterns: tuple[str, ...], *, keepalive_s: float
    ) -> None:
        check_positive("keepalive_s", keepalive_s)
        if not channels and not patterns:
            raise ConfigError("subscribe to at least one channel or pattern")
        self.client = client
        self._channels = channels
        self._patterns = patterns
        self._keepalive_s = keepalive_s
        self._conn: AbstractConnection | None = None
        self._tasks = Tasks(on_crash=self._crashed)
        self._state = 0  # 0 new, 1 open, 2 closed
        self._last_rx = 0.0
        self.stats = SubscriptionStats()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        raise NotImplementedError

    def _on_gap(self) -> None:
        """The link broke: messages may be lost until it is back (called before resubscribing)."""

    def _on_resubscribed(self) -> None:
        """Subscribed again: from here on nothing is missed."""

    def _crashed(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def _subscribe(self) -> AbstractConnection:
        """A new connection, subscribed: returns once Redis confirmed every subscription."""
        conn = self.client.connection()
        try:
            # The connection has no read timeout (it waits for messages); a server that
            # accepts but never confirms must still not hang us.
            with anyio.fail_after(min(10.0, max(1.0, 2 * self._keepalive_s))):
                return await self._confirm(conn)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def _confirm(self, conn: AbstractConnection) -> AbstractConnection:
        await conn.connect()  # type: ignore[no-untyped-call]
        if self._channels:
            await conn.send_command("SUBSCRIBE", *self._channels)
        if self._patterns:
            await conn.send_command("PSUBSCRIBE", *self._patterns)
        confirmed = 0
        while confirmed < len(self._channels) + len(self._patterns):
            reply = await conn.read_response(push_request=True)
            if isinstance(reply, list) and reply and reply[0] in (b"subscribe", b"psubscribe"):
                confirmed += 1
            elif isinstance(reply, list) and len(reply) >= 3:
                self._dispatch(reply)
        self._last_rx = time.monotonic()
        return conn

    async def _start(self) -> None:
        if self._state:
            raise ClosedError("a subscription can be opened only once; subscribe again")
        self.client.check_open()
        self._state = 1
        try:
            self._conn = await self._subscribe()
        except (rex.RedisError, OSError) as exc:
            self._state = 2
            raise translate(exc) from exc
        self.client.subscribers.add(self)
        self._tasks.spawn(self._read_loop(), "aioredmq-subscriber")
        self._tasks.spawn(self._keepalive_loop(), "aioredmq-subscriber-keepalive")

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            self._on_message(reply[1], reply[2])
        elif kind == b"pmessage":
            self._on_message(reply[2], reply[3])

    async def _read_loop(self) -> None:
        failures = 0
        while self._state == 1:
            conn = self._conn
            try:
                if conn is None:
                    self._on_gap()  # before _subscribe(): it may already dispatch messages
                    self._conn = conn = await self._subscribe()
                    failures = 0
                    self.stats.reconnects += 1
                    self.stats.gaps += 1
                    log.warning("subscription to %s resubscribed; messages may have been missed", self._names())
                    self._on_resubscribed()
                reply = await conn.read_response(push_request=True)
            except (rex.RedisError, OSError) as exc:
                if self._state != 1:
                    return
                if conn is not None:
                    self.stats.connection_losses += 1
                    await conn.disconnect(nowait=True)
                    log.warning("subscription to %s lost its connection (%s); reconnecting", self._names(), exc)
                    self._conn = None
                failures += 1
                await anyio.sleep(min(0.05 * 2 ** min(failures, 10), _MAX_BACKOFF_S))
                continue
            self._last_rx = time.monotonic()
            if isinstance(reply, list) and len(reply) >= 3:
                self._dispatch(reply)
                if self._cut_off():
                    self._conn = None
                    await conn.disconnect(nowait=True)
                    return

    def _cut_off(self) -> bool:
        """True when the subscriber must stop listening (its overflow policy said so)."""
        return False

    async def _keepalive_loop(self) -> None:
        while self._state == 1:
            await anyio.sleep(self._keepalive_s)
            conn = self._conn
            if conn is None:
                continue
            if time.monotonic() - self._last_rx > 2 * self._keepalive_s:
                # Not even the last PING was answered: the link is dead without a reset.
                log.warning("subscription to %s: no reply to PING; reconnecting", self._names())
                await conn.disconnect(nowait=True)
                continue
            try:
                await conn.send_command("PING")
            except (rex.RedisError, OSError):
                continue  # the reader sees the same failure and reconnects

    @property
    def closed(self) -> bool:
        return self._state == 2

    def _names(self) -> str:
        return ", ".join([*self._channels, *self._patterns])

    async def _stop(self) -> None:
        if self._state == 2:
            return
        self._state = 2
        self.client.subscribers.discard(self)
        with anyio.CancelScope(shield=True):
            await self._tasks.aclose()
            if self._conn is not None:
                await self._conn.disconnect(nowait=True)
                self._conn = None


class Subscription(Subscriber, Generic[T]):
    """``async with mq.channel("news").subscribe() as sub: async for m in sub``."""

    def __init__(
        self,
        client: Client,
        channels: tuple[str, ...],
        patterns: tuple[str, ...],
        *,
        codec: str | Codec,
        max_pending: int,
        overflow: Overflow,
        keepalive_s: float,
    ) -> None:
        check_positive("max_pending", max_pending, integer=True)
        if overflow not in ("drop_oldest", "disconnect"):
            raise ConfigError(f"overflow={overflow!r} must be 'drop_oldest' or 'disconnect'")
        prefix = client.prefix
        super().__init__(
            client,
            tuple(dict.fromkeys(channel_name(prefix, check_name("channel", c)) for c in channels)),
            tuple(dict.fromkeys(channel_name(prefix, check_pattern(p)) for p in patterns)),
            keepalive_s=keepalive_s,
        )
        self.codec = get_codec(codec)
        self.max_pending = max_pending
        self.overflow: Overflow = overflow
        # Wire names are '<prefix>:{<name>}:channel': the name starts after '<prefix>:{'.
        self._name_start = len(prefix) + 2
        self._buf: deque[Broadcast[T]] = deque()
        self._has = asyncio.Event()
        self._gap = False
        self._error: BaseException | None = None

    async def __aenter__(self) -> Self:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe (close the connection). Buffered messages are discarded."""
        await self._stop()
        self._buf.clear()
        self._has.set()

    @property
    def pending(self) -> int:
        """Messages received and not yet taken by the iterator."""
        return len(self._buf)

    def _crashed(self, exc: BaseException) -> None:
        self._error = exc
        self._has.set()

    def _cut_off(self) -> bool:
        return self._error is not None

    def _on_gap(self) -> None:
        self._gap = True

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if self._error is not None:
            return  # cut off: the reader is closing the connection
        self.stats.received += 1
        try:
            env = decode(data)
            if env.codec != self.codec.name:
                raise DecodeError(f"written with codec {env.codec!r}; this subscriber uses {self.codec.name!r}")
            body = self.codec.decode(env.body)
        except Exception as exc:  # a codec of the user's may raise anything; bad input never ends the loop
            self.stats.undecodable += 1
            log.warning("subscription: undecodable message on %r skipped: %s", channel, exc)
            return
        if len(self._buf) >= self.max_pending:
            if self.overflow == "disconnect":
                self._error = SlowSubscriberError(
                    f"the subscriber fell {self.max_pending} messages behind (overflow='disconnect'); "
                    "it was unsubscribed. Handle messages faster, raise max_pending, or use 'drop_oldest'"
                )
                self._has.set()
                return
            dropped = self._buf.popleft()
            self.stats.dropped += 1
            if not dropped.gap:  # a new gap, not one that grows
                self.stats.gaps += 1
            if self._buf:
                self._buf[0] = replace(self._buf[0], gap=True)
            else:
                self._gap = True
        name = channel[self._name_start : -len("}:channel")].decode("utf-8", "replace")
        self._buf.append(Broadcast(name, env.id, body, env.headers, env.published_ms / 1000.0, self._gap))
        self._gap = False
        self._has.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Broadcast[T]:
        while not self._buf:
            if self._error is not None:
                raise self._error
            if self._state != 1:
                if self._state == 0:
                    raise ClosedError("the subscription is not open: use 'async with ... subscribe()'")
                raise StopAsyncIteration
            self._has.clear()
            await self._has.wait()
        return self._buf.popleft()


class Channel(Generic[T]):
    """A pub/sub channel. Get one with ``client.channel(name)``."""

    def __init__(self, client: Client, name: str, *, codec: str | Codec, max_body_bytes: int) -> None:
        self.client = client
        self.name = check_name("channel", name)
        self.codec = get_codec(codec)
        check_positive("max_body_bytes", max_body_bytes, integer=True)
        self.max_body_bytes = max_body_bytes
        self._wire = channel_name(client.prefix, name)

    def __repr__(self) -> str:
        return f"<Channel {self.name!r}>"

    async def publish(self, body: T, *, headers: Mapping[str, str] | None = None) -> int:
        """Send one message to every current subscriber; return how many received it.
        At most once: nobody listening means nobody gets it."""
        self.client.check_open()
        _, (raw,) = check_encoded(self.codec, self.max_body_bytes, repr(self.name), (body,), headers)
        received: int = await execute(self.client.redis, "PUBLISH", self._wire, raw)
        return received

    def subscribe(
        self,
        *,
        max_pending: int = 1000,
        overflow: Overflow = "drop_oldest",
        keepalive_s: float = 30.0,
    ) -> Subscription[T]:
        """Subscribe to this channel; see :meth:`Client.subscribe`."""
        return self.client.subscribe(
            self.name, codec=self.codec, max_pending=max_pending, overflow=overflow, keepalive_s=keepalive_s
        )


class DueWatcher(Subscriber):
    """Tells consumers when a delayed message becomes the earliest of its queue or stream.

    One per client, subscribed to the pattern of every due-time channel. A scheduling
    script publishes the milliseconds until the new earliest due time; after a
    reconnect every watcher is told to look again, since a notice may have been lost.
    """

    def __init__(self, client: Client) -> None:
        super().__init__(client, (), (f"{client.prefix}:{{*}}:due",), keepalive_s=30.0)
        self._watchers: dict[bytes, set[Callable[[float | None], None]]] = {}

    def _crashed(self, exc: BaseException) -> None:
        log.error("due-time watcher crashed", exc_info=exc)

    def watch(self, channel: str, callback: Callable[[float | None], None]) -> Callable[[], None]:
        """Call ``callback(seconds until due)`` on each notice for ``channel``, and
        ``callback(None)`` after a possible gap. Returns the function that stops it."""
        key = channel.encode()
        self._watchers.setdefault(key, set()).add(callback)

        def stop() -> None:
            self._watchers.get(key, set()).discard(callback)

        return stop

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            delay_s = max(0.0, int(data) / 1000.0)
        except ValueError:
            return
        for callback in list(self._watchers.get(channel, ())):
            callback(delay_s)

    def _on_resubscribed(self) -> None:
        for callbacks in list(self._watchers.values()):
            for callback in list(callbacks):
                callback(None)

    async def start(self) -> None:
        """Subscribe; it stops when its client closes (as every subscriber does)."""
        await self._start()
