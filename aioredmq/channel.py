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

Sharded channels (``SPUBLISH``/``SSUBSCRIBE``, the default on a cluster) live on the
master that owns the channel's slot: a subscription holds one connection per slot
among its channels, and after a failover or a slot migration it resubscribes where
the refreshed slot map says the slot now is. Plain pub/sub on a cluster copies every
message to every node; sharded pub/sub costs only the owning shard.
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
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

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
_MAX_BACKOFF_S = 0.5  # a failover is over in seconds
# A link's failures: the connection, or (sharded, on a cluster) no node for the slot yet.
_LINK_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError)


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


class _Link:
    """One connection kept subscribed to some of a subscriber's wire names: channels and
    patterns with plain pub/sub, or the channels of one cluster slot when sharded."""

    __slots__ = ("channels", "conn", "last_rx", "owner", "patterns", "sharded")

    def __init__(self, owner: Subscriber, channels: tuple[str, ...], patterns: tuple[str, ...], sharded: bool) -> None:
        self.owner = owner
        self.channels = channels
        self.patterns = patterns
        self.sharded = sharded
        self.conn: AbstractConnection | None = None
        self.last_rx = 0.0

    def names(self) -> str:
        return ", ".join([*self.channels, *self.patterns])

    async def subscribe(self, *, refresh: bool = False) -> AbstractConnection:
        """A new connection, subscribed: returns once Redis confirmed every subscription.
        ``refresh``: a sharded link first asks the cluster for its slot map again (the
        slot may have moved, or its master failed over)."""
        client = self.owner.client
        key = None
        if self.sharded and isinstance(client.redis, RedisCluster):
            await (client.redis.nodes_manager.initialize() if refresh else client.redis.initialize())
            key = self.channels[0]
        conn = client.connection(key)
        try:
            # The connection has no read timeout (it waits for messages); a server that
            # accepts but never confirms must still not hang us.
            keepalive_s = self.owner._keepalive_s
            with anyio.fail_after(min(10.0, max(1.0, 2 * keepalive_s))):
                return await self._confirm(conn)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def _confirm(self, conn: AbstractConnection) -> AbstractConnection:
        await conn.connect()  # type: ignore[no-untyped-call]
        if self.channels:
            await conn.send_command("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", *self.channels)
        if self.patterns:
            await conn.send_command("PSUBSCRIBE", *self.patterns)
        confirmed = 0
        while confirmed < len(self.channels) + len(self.patterns):
            reply = await conn.read_response(push_request=True)
            if isinstance(reply, list) and reply and reply[0] in _CONFIRMATIONS:
                confirmed += 1
            elif isinstance(reply, list) and len(reply) >= 3:
                self.owner._dispatch(reply)
        self.last_rx = time.monotonic()
        return conn

    async def read_loop(self) -> None:
        owner = self.owner
        stats = owner.stats
        failures = 0
        while owner._state == 1:
            conn = self.conn
            try:
                if conn is None:
                    owner._on_gap()  # before subscribe(): it may already dispatch messages
                    self.conn = conn = await self.subscribe(refresh=True)
                    failures = 0
                    stats.reconnects += 1
                    stats.gaps += 1
                    log.warning("subscription to %s resubscribed; messages may have been missed", self.names())
                    owner._on_resubscribed()
                reply = await conn.read_response(push_request=True)
            except _LINK_ERRORS as exc:
                if owner._state != 1:
                    return
                if conn is not None:
                    stats.connection_losses += 1
                    await conn.disconnect(nowait=True)
                    log.warning("subscription to %s lost its connection (%s); reconnecting", self.names(), exc)
                    self.conn = None
                failures += 1
                await anyio.sleep(min(0.05 * 2 ** min(failures, 10), _MAX_BACKOFF_S))
                continue
            self.last_rx = time.monotonic()
            if not isinstance(reply, list) or not reply:
                continue
            if reply[0] == b"sunsubscribe":
                # Redis unsubscribes a shard channel whose slot moved to another node:
                # subscribe again where the slot map now says it lives.
                stats.connection_losses += 1
                log.warning("subscription to %s: its slot moved; resubscribing", self.names())
                self.conn = None
                await conn.disconnect(nowait=True)
            elif len(reply) >= 3:
                owner._dispatch(reply)
                if owner._cut_off():
                    self.conn = None
                    await conn.disconnect(nowait=True)
                    return

    async def keepalive_loop(self) -> None:
        owner = self.owner
        while owner._state == 1:
            await anyio.sleep(owner._keepalive_s)
            conn = self.conn
            if conn is None:
                continue
            if time.monotonic() - self.last_rx > 2 * owner._keepalive_s:
                # Not even the last PING was answered: the link is dead without a reset.
                log.warning("subscription to %s: no reply to PING; reconnecting", self.names())
                await conn.disconnect(nowait=True)
                continue
            try:
                await conn.send_command("PING")
            except (rex.RedisError, OSError):
                continue  # the reader sees the same failure and reconnects

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.disconnect(nowait=True)
            self.conn = None


_CONFIRMATIONS = (b"subscribe", b"psubscribe", b"ssubscribe")
_MESSAGES = {b"message": 1, b"smessage": 1, b"pmessage": 2}  # where the channel is in the reply


class Subscriber:
    """Connections kept subscribed to fixed channels and patterns (wire names): one for
    plain pub/sub; with ``sharded`` channels, one per cluster slot among them (a shard
    channel is served by the master that owns its slot).

    Subclasses receive ``_on_message(wire_channel, data)``, ``_on_gap()`` and
    ``_on_resubscribed()``; all run in a reader task and must not block.
    """

    def __init__(
        self,
        client: Client,
        channels: tuple[str, ...],
        patterns: tuple[str, ...],
        *,
        keepalive_s: float,
        sharded: bool | None = False,
    ) -> None:
        check_positive("keepalive_s", keepalive_s)
        if not channels and not patterns:
            raise ConfigError("subscribe to at least one channel or pattern")
        self.client = client
        self._keepalive_s = keepalive_s
        self._channels = channels
        self._patterns = patterns
        self._sharded = sharded  # None: as the client says (see Client.channels_sharded)
        self._links: list[_Link] = []
        self._tasks = Tasks(on_crash=self._crashed)
        self._state = 0  # 0 new, 1 open, 2 closed
        self.stats = SubscriptionStats()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        raise NotImplementedError

    def _on_gap(self) -> None:
        """A link broke: messages may be lost until it is back (called before resubscribing)."""

    def _on_resubscribed(self) -> None:
        """Subscribed again: from here on nothing is missed."""

    def _crashed(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        if self._state:
            raise ClosedError("a subscription can be opened only once; subscribe again")
        self.client.check_open()
        self._state = 1
        try:
            self._links = await self._make_links()
            for link in self._links:
                link.conn = await link.subscribe()
        except BaseException as exc:
            self._state = 2
            with anyio.CancelScope(shield=True):
                for link in self._links:
                    await link.close()
            if isinstance(exc, _LINK_ERRORS):
                raise translate(exc) from exc
            raise
        self.client.subscribers.add(self)
        for link in self._links:
            self._tasks.spawn(link.read_loop(), "aioredmq-subscriber")
            self._tasks.spawn(link.keepalive_loop(), "aioredmq-subscriber-keepalive")

    async def _make_links(self) -> list[_Link]:
        channels, patterns, client = self._channels, self._patterns, self.client
        sharded = await client.channels_sharded() if self._sharded is None else self._sharded
        if sharded and patterns:
            raise ConfigError(
                "pattern subscriptions need plain pub/sub, and this client's channels are sharded "
                "(SPUBLISH reaches no pattern): connect with sharded_channels=False to use patterns"
            )
        if not (sharded and client.cluster):
            return [_Link(self, channels, patterns, sharded)]
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        return [_Link(self, tuple(group), (), True) for group in by_slot.values()]

    def _dispatch(self, reply: list[Any]) -> None:
        at = _MESSAGES.get(reply[0])
        if at is not None and len(reply) > at + 1:
            self._on_message(reply[at], reply[at + 1])

    def _cut_off(self) -> bool:
        """True when the subscriber must stop listening (its overflow policy said so)."""
        return False

    @property
    def closed(self) -> bool:
        return self._state == 2

    async def _stop(self) -> None:
        if self._state == 2:
            return
        self._state = 2
        self.client.subscribers.discard(self)
        with anyio.CancelScope(shield=True):
            await self._tasks.aclose()
            for link in self._links:
                await link.close()


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
            sharded=None,
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
        command = "SPUBLISH" if await self.client.channels_sharded() else "PUBLISH"
        received: int = await execute(self.client.redis, command, self._wire, raw)
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
