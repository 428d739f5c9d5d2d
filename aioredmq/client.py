"""The connection to Redis: pools, dedicated blocking connections and background tasks.

``connect()`` returns a :class:`Client`, an async context manager. It owns the pools
and tasks it creates and closes them on exit; a redis-py client passed in by the
caller is used as it is and never closed by us.

redis-py re-sends a command after a connection error by default (three times in
redis-py 8). For a queue that silently duplicates writes, so clients made here have
retries off; aioredmq retries on its own terms, where it knows a retry is safe (the
publish script drops a batch it already applied, settles check the in-flight list).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import random
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack, overload

import anyio
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .codecs import Codec
from .commands import AnyRedis
from .config import RetryPolicy, check_positive
from .errors import TRANSIENT, AioredmqError, ClosedError, ConfigError, PublishUnconfirmedError, mapped
from .keys import check_name
from .observe import Metrics, Tracing
from .tasks import Tasks

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency, but may be missing
    _pack_command = None

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .base_consumer import BaseConsumer
    from .channel import Channel, DueWatcher, Overflow, Subscriber, Subscription
    from .idempotency import Idempotency
    from .message import Message
    from .partitioned import PartitionedConsumer, PartitionedQueue
    from .queue import Queue
    from .stream import Stream

__all__ = ("Client", "connect")

log = logging.getLogger("aioredmq")
T = TypeVar("T")


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class _HiredisPacking:
    """Pack commands in C. redis-py's asyncio connections pack in Python, which costs
    more than the round trip for a script call carrying a thousand envelopes."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # 'SCRIPT LOAD' is two arguments
            args = (*args[0].split(), *args[1:])
        assert _pack_command is not None  # _fast() uses this class only when hiredis is there
        return [_pack_command(args)]


# The oldest Redis whose commands the scripts use (BLMOVE, XAUTOCLAIM, RPOP with a count).
_MIN_REDIS = (6, 2)

# Connections of the control pool (see Client.control): its commands are short scripts.
_CONTROL_CONNECTIONS = 4


def _fast(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` with C packing, when hiredis is there to do it."""
    if _pack_command is None or issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


class QueueOptions(TypedDict, total=False):
    """The settings of :meth:`Client.queue` (and, with ``partitions``, of ``partitioned``)."""

    codec: str | Codec
    retry: RetryPolicy | None
    lease_s: float
    max_body_bytes: int
    max_buffered: int


class PartitionedOptions(QueueOptions, total=False):
    partitions: int


class StreamOptions(QueueOptions, total=False):
    maxlen: int | None
    max_age_s: float | None
    trim_acked: bool


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class Client:
    """A connection to one Redis deployment. Create it with :func:`connect`."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        owned: bool,
        prefix: str = "aioredmq",
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        sharded_channels: bool | None = None,
        close_timeout_s: float = 10.0,
    ) -> None:
        check_positive("close_timeout_s", close_timeout_s)
        self.close_timeout_s = close_timeout_s
        if metrics is not None and not isinstance(metrics, Metrics):
            raise ConfigError(f"metrics={metrics!r} must be an aioredmq.observe.Metrics")
        if tracing is not None and not isinstance(tracing, Tracing):
            raise ConfigError(f"tracing={tracing!r} must be an aioredmq.observe.Tracing")
        self.redis = redis
        self.prefix = check_name("prefix", prefix)
        self.metrics = metrics
        """Where counters and timings go (``None``: nowhere)."""
        self.tracing = tracing
        """What makes spans of publishes and handler calls (``None``: nothing)."""
        if sharded_channels not in (None, True, False):
            raise ConfigError(f"sharded_channels={sharded_channels!r} must be True, False or None")
        # None until asked on a cluster: sharded there when the server is Redis 7 or newer.
        self._sharded: bool | None = sharded_channels if sharded_channels is not None or self.cluster else False
        self._owned = owned
        self._state = _State.UNOPENED
        self._tasks = Tasks()
        self._queues: dict[str, Queue[Any]] = {}
        self._streams: dict[str, Stream[Any]] = {}
        self._partitioned: dict[str, PartitionedQueue[Any]] = {}
        self.consumers: set[BaseConsumer[Any]] = set()  # open ones; closed before the pools
        # Open members of partitioned queues; closed before the consumers, so that their
        # balance tasks stop renewing holds and other members get those partitions.
        self.members: set[PartitionedConsumer[Any]] = set()
        self.subscribers: set[Subscriber] = set()  # open subscriptions; closed with the client
        self._due_watcher: DueWatcher | None = None
        self._due_lock = anyio.Lock()
        self._dedicated: set[AnyRedis] = set()
        self._control: AnyRedis | None = None
        self.server_checked = False  # see check_server
        self._also_close: list[Redis] = []  # the sentinels' clients, with a Sentinel master

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._state is not _State.UNOPENED:
            raise ClosedError("a Client can be opened only once; call connect() again")
        self._state = _State.OPENED
        self._tasks.spawn(self._check_memory_policy(), "aioredmq-memory-policy")
        return self

    async def _check_memory_policy(self) -> None:
        """Warn once when Redis may evict keys: with any ``maxmemory-policy`` but
        ``noeviction`` a full Redis deletes keys, queues among them. Asked once Redis
        answers, through ``INFO memory`` (managed services that disable CONFIG allow it);
        skipped where INFO is not allowed either."""
        for delay in (*(0.5,) * 4, *(5.0,) * 11):
            try:
                with mapped():
                    reply = await self.redis.info("memory")
            except TRANSIENT:
                await anyio.sleep(delay)
                continue
            except AioredmqError as exc:
                log.debug("not checking maxmemory-policy: %s", exc)
                return
            evicting = sorted({p for p in _info_values(reply, "maxmemory_policy") if p != "noeviction"})
            if evicting:
                log.warning(
                    "Redis has maxmemory-policy %s: once full, it deletes keys, and messages with "
                    "them. Set maxmemory-policy noeviction on the Redis that holds queues.",
                    "/".join(evicting),
                )
            return

    async def check_server(self) -> None:
        """Refuse a Redis older than 6.2, once, at the first consumer or publish: its
        scripts need BLMOVE, XAUTOCLAIM and RPOP with a count, which an older server rejects from inside
        a script as an "unknown command". Asked through ``INFO server``; skipped where INFO
        is not allowed, and asked again next time while Redis cannot be reached."""
        if self.server_checked:
            return
        try:
            with mapped():
                reply = await self.redis.info("server")
        except TRANSIENT:
            return  # the caller's own command meets the outage, and retries
        except AioredmqError as exc:
            log.debug("not checking the Redis version: %s", exc)
            self.server_checked = True
            return
        self.server_checked = True
        for text in _info_values(reply, "redis_version"):
            if _version(text) < _MIN_REDIS:
                raise ConfigError(
                    f"Redis {text} is too old: aioredmq needs Redis {'.'.join(map(str, _MIN_REDIS))} or newer "
                    "(for BLMOVE, XAUTOCLAIM and RPOP with a count)"
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        except PublishUnconfirmedError as unconfirmed:
            if exc is None:
                raise
            log.error("while closing on %r: %s (ids: %s)", exc, unconfirmed, ", ".join(unconfirmed.ids))

    async def aclose(self) -> None:
        """Flush every producer, stop background tasks, close what this client created.

        Consumers and producers get ``close_timeout_s`` (from :func:`connect`), together:
        consumers to give back what they hold (what they cannot is recovered once their
        leases expire), producers to have what they buffer confirmed. What is not
        confirmed by then is given up and, once everything is closed, raised as one
        ``PublishUnconfirmedError`` whose ``ids`` name it (those messages may or may not be
        in Redis). Its publishers got the same error."""
        if self._state is _State.CLOSED:
            return
        was_open = self._state is _State.OPENED
        self._state = _State.CLOSED
        unconfirmed: tuple[str, ...] = ()
        deadline = anyio.current_time() + self.close_timeout_s
        with anyio.CancelScope(shield=True):
            try:
                if was_open:
                    # Consumers first: they give back what they hold while Redis is reachable;
                    # together, by one deadline, so a silent Redis costs one timeout. Members
                    # before the rest: they close their partitions' consumers themselves.
                    for closing in (list(self.members), list(self.consumers)):
                        async with anyio.create_task_group() as tg:
                            for one in closing:
                                tg.start_soon(partial(one.aclose, deadline=deadline))
                    for subscriber in list(self.subscribers):
                        await subscriber._stop()
                    partitions = [q for pq in self._partitioned.values() for q in pq.partitions]
                    for source in [*self._queues.values(), *self._streams.values(), *partitions]:
                        unconfirmed += await source.aclose_producers(deadline)
            finally:
                await self._tasks.aclose()
                for conn in list(self._dedicated):
                    await _close(conn)
                self._dedicated.clear()
                if self._owned:
                    await _close(self.redis)
                for other in self._also_close:
                    await _close(other)
        if unconfirmed:
            raise PublishUnconfirmedError(
                f"closing: {len(unconfirmed)} message(s) were not confirmed within close_timeout_s="
                f"{self.close_timeout_s}; they may or may not be in Redis",
                unconfirmed,
            )

    def check_open(self) -> None:
        if self._state is _State.UNOPENED:
            raise ClosedError("the Client is not open: use 'async with aioredmq.connect(...)'")
        if self._state is _State.CLOSED:
            raise ClosedError("the Client is closed")

    def start_background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` until the client closes."""
        self.check_open()
        self._tasks.spawn(coro, name)

    # -- connections -----------------------------------------------------------------

    @property
    def cluster(self) -> bool:
        """Whether this client talks to a Redis Cluster."""
        return isinstance(self.redis, RedisCluster)

    @property
    def control(self) -> AnyRedis:
        """What heartbeats, reaps and partition balances use: a few connections of their
        own, so that handlers' traffic on the shared pool (which makes callers wait once
        it is exhausted) never delays a lease renewal. A cluster client's node pools and a
        Sentinel pool are shared as they are (they open connections as needed)."""
        if self._control is None:
            pool = self.redis.connection_pool if isinstance(self.redis, Redis) else None
            if pool is None or isinstance(pool, SentinelConnectionPool):
                self._control = self.redis
            else:
                self.check_open()
                control = Redis(
                    connection_pool=BlockingConnectionPool(
                        connection_class=_fast(pool.connection_class),
                        max_connections=_CONTROL_CONNECTIONS,
                        timeout=None,
                        **pool.connection_kwargs,
                    )
                )
                self._dedicated.add(control)
                self._control = control
        return self._control

    def dedicated(self, socket_timeout_s: float) -> AnyRedis:
        """A single-connection client with the same settings, for blocking reads.

        Its socket timeout must exceed the block time, so a long BLMOVE is not cut
        short by the pool's timeout, and it never stalls publishes or acks. On a
        cluster: a cluster client of its own (one connection per node it reads from).
        """
        self.check_open()
        conn: AnyRedis
        if isinstance(self.redis, RedisCluster):
            nodes = [ClusterNode(n.host, n.port) for n in self.redis.get_nodes()]
            conn = RedisCluster(startup_nodes=nodes, socket_timeout=socket_timeout_s, **_cluster_auth(self.redis))
            self._dedicated.add(conn)
            return conn
        pool = self.redis.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(socket_timeout=socket_timeout_s, retry=_no_retry(), retry_on_error=[])
        # A pool of one, not single_connection_client: redis-py's single-connection path
        # mishandles a command cancelled mid-read (it releases the connection twice).
        conn = Redis(
            connection_pool=ConnectionPool(connection_class=_fast(pool.connection_class), max_connections=1, **kwargs)
        )
        self._dedicated.add(conn)
        return conn

    async def channels_sharded(self) -> bool:
        """Whether channels publish with SPUBLISH and subscribe with SSUBSCRIBE: as
        :func:`connect` was told, or else on a cluster whose servers are Redis 7 or newer
        (sharded pub/sub came with 7.0; older clusters keep plain pub/sub)."""
        if self._sharded is None:
            with mapped():
                info = await self.redis.info("server")
            major = str(info.get("redis_version", "0")).split(".", 1)[0]
            self._sharded = major.isdigit() and int(major) >= 7
        return self._sharded

    def connection(self, key: str | None = None) -> AbstractConnection:
        """A bare connection with the same settings and no read timeout, for a subscriber
        that waits indefinitely; the caller connects and disconnects it. On a cluster:
        to the master that owns ``key`` (by the slot map the client has), or any master."""
        self.check_open()
        if isinstance(self.redis, RedisCluster):
            if key is not None:
                node = self.redis.get_node_from_key(key)
                assert node is not None  # None only when asked for a replica
            else:
                # Plain pub/sub reaches every node of a cluster: any master will do, and
                # a reconnect after a failover picks again. Before its first command a
                # cluster client knows only its startup nodes.
                nodes = self.redis.get_primaries() or list(self.redis.nodes_manager.startup_nodes.values())
                node = random.choice(nodes)
            node_conn: AbstractConnection = node.connection_class(**{**node.connection_kwargs, "socket_timeout": None})
            return node_conn
        pool = self.redis.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(socket_timeout=None, retry=_no_retry(), retry_on_error=[])
        conn: AbstractConnection = _fast(pool.connection_class)(**kwargs)
        return conn

    async def due_watcher(self) -> DueWatcher:
        """The one subscriber that hears of new earliest due times, started on first use."""
        from .channel import DueWatcher

        async with self._due_lock:
            if self._due_watcher is None:
                watcher = DueWatcher(self)
                await watcher.start()
                self._due_watcher = watcher
            return self._due_watcher

    async def release_dedicated(self, conn: AnyRedis) -> None:
        self._dedicated.discard(conn)
        with anyio.CancelScope(shield=True):
            await _close(conn)

    # -- transports ------------------------------------------------------------------

    @overload
    def queue(self, name: str, *, body: type[T], **options: Unpack[QueueOptions]) -> Queue[T]: ...

    @overload
    def queue(self, name: str, *, body: None = None, **options: Unpack[QueueOptions]) -> Queue[Any]: ...

    def queue(self, name: str, *, body: type[Any] | None = None, **options: Unpack[QueueOptions]) -> Queue[Any]:
        """The reliable list queue ``name``. The same name gives the same object.

        ``lease_s`` (30): how long a consumer that stopped heartbeating keeps its messages
        before another consumer recovers them. ``max_buffered`` (10,000): messages a
        producer holds before ``publish()`` waits. ``max_body_bytes`` (16 MiB): the largest
        encoded message ``publish()`` accepts. ``codec`` ("json"), ``retry``
        (``RetryPolicy()``). ``body``: a dataclass, pydantic model or msgspec Struct that
        every body is (see :mod:`aioredmq.typed`).
        """
        from .queue import Queue

        self.check_open()
        return _once(self._queues, Queue(self, name, body=body, **_settings(options)))

    @overload
    def stream(self, name: str, *, body: type[T], **options: Unpack[StreamOptions]) -> Stream[T]: ...

    @overload
    def stream(self, name: str, *, body: None = None, **options: Unpack[StreamOptions]) -> Stream[Any]: ...

    def stream(self, name: str, *, body: type[Any] | None = None, **options: Unpack[StreamOptions]) -> Stream[Any]:
        """The stream ``name``, read by consumer groups. The same name gives the same object.

        The options of :meth:`queue`, and: ``maxlen`` / ``max_age_s`` trim approximately
        on publish; with ``trim_acked`` the stream instead drops exactly what every group
        has acked, and the two become hard caps whose drops of un-acked entries are
        counted. ``lease_s`` is how long an entry may sit idle with a consumer that
        stopped renewing it before another one takes it.
        """
        from .stream import Stream

        self.check_open()
        settings = _settings(options, maxlen=None, max_age_s=None, trim_acked=False)
        return _once(self._streams, Stream(self, name, body=body, **settings))

    @overload
    def partitioned(
        self, name: str, *, body: type[T], **options: Unpack[PartitionedOptions]
    ) -> PartitionedQueue[T]: ...

    @overload
    def partitioned(
        self, name: str, *, body: None = None, **options: Unpack[PartitionedOptions]
    ) -> PartitionedQueue[Any]: ...

    def partitioned(
        self, name: str, *, body: type[Any] | None = None, **options: Unpack[PartitionedOptions]
    ) -> PartitionedQueue[Any]:
        """The partitioned queue ``name``: per-key ordering over ``partitions`` (16) list
        queues, each held by one consumer at a time, with the options of :meth:`queue`.
        Every producer and consumer must agree on ``partitions``: changing it moves keys to
        other partitions. ``lease_s`` also bounds how long a crashed consumer's partitions
        wait before another takes them."""
        from .partitioned import PartitionedQueue

        self.check_open()
        return _once(self._partitioned, PartitionedQueue(self, name, body=body, **_settings(options, partitions=16)))

    def channel(
        self, name: str, *, codec: str | Codec = "json", max_body_bytes: int = 16 * 1024 * 1024
    ) -> Channel[Any]:
        """The pub/sub channel ``name``: ``publish()`` to every current subscriber, at most once."""
        from .channel import Channel

        self.check_open()
        return Channel(self, name, codec=codec, max_body_bytes=max_body_bytes)

    def subscribe(
        self,
        *channels: str,
        patterns: tuple[str, ...] | list[str] = (),
        codec: str | Codec = "json",
        max_pending: int = 1000,
        overflow: Overflow = "drop_oldest",
        keepalive_s: float = 30.0,
    ) -> Subscription[Any]:
        """Subscribe to channels by name and by glob pattern (``"news.*"``); use
        ``async with mq.subscribe("a", patterns=["b.*"]) as sub: async for m in sub``.

        At most ``max_pending`` received messages wait for the iterator; past that,
        ``overflow="drop_oldest"`` drops the oldest (the next message has ``gap=True``) and
        ``"disconnect"`` ends the subscription with :class:`SlowSubscriberError`. A PING
        every ``keepalive_s`` detects a dead link; any loss reconnects and resubscribes.
        """
        from .channel import Subscription

        self.check_open()
        return Subscription(
            self,
            tuple(channels),
            tuple(patterns),
            codec=codec,
            max_pending=max_pending,
            overflow=overflow,
            keepalive_s=keepalive_s,
        )

    async def run(
        self,
        queue: Queue[T] | Stream[T] | PartitionedQueue[T],
        handler: Callable[[Message[T]], Awaitable[object]],
        *,
        group: str | None = None,
        concurrency: int = 16,
        prefetch: int | None = None,
        handler_timeout_s: float | None = None,
        grace_s: float = 30.0,
        name: str | None = None,
        idempotency: Idempotency | None = None,
        opened: Callable[[], None] | None = None,
    ) -> None:
        """Run ``handler`` on every message of ``queue`` until cancelled. See :func:`run`.

        ``opened`` is called once the consumer is open: opening waits for Redis (and
        retries while it cannot be reached), so this is when the runner is ready.
        """
        from .runner import run

        await run(
            queue,
            handler,
            group=group,
            concurrency=concurrency,
            prefetch=prefetch,
            handler_timeout_s=handler_timeout_s,
            grace_s=grace_s,
            name=name,
            idempotency=idempotency,
            opened=opened,
        )


S = TypeVar("S", "Queue[Any]", "Stream[Any]", "PartitionedQueue[Any]")


_AUTH_KEYS = ("username", "password", "credential_provider", "client_name", "socket_connect_timeout", "protocol")
_SSL_KEYS = ("ssl_ca_certs", "ssl_ca_data", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def _cluster_auth(rc: RedisCluster) -> dict[str, Any]:
    """What a second cluster client needs to reach the same cluster as ``rc``."""
    kwargs = rc.connection_kwargs
    out = {k: kwargs[k] for k in _AUTH_KEYS if kwargs.get(k) is not None}
    if any(kwargs.get(k) is not None for k in _SSL_KEYS):
        out.update(ssl=True, **{k: kwargs[k] for k in _SSL_KEYS if kwargs.get(k) is not None})
    return out


def _info_values(reply: Any, field: str) -> list[str]:
    """The values of ``field`` in an INFO reply (a cluster client's may hold one per node)."""
    if isinstance(reply, dict):
        found: list[str] = []
        for key, value in reply.items():
            name = key.decode() if isinstance(key, bytes) else key
            if name == field:
                found.append(value.decode() if isinstance(value, bytes) else str(value))
            else:
                found += _info_values(value, field)
        return found
    return []


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


async def _close(redis: AnyRedis) -> None:
    if isinstance(redis, RedisCluster):
        await redis.aclose()
    else:
        await redis.aclose(close_connection_pool=True)


_QUEUE_DEFAULTS: dict[str, Any] = {
    "codec": "json",
    "retry": None,
    "lease_s": 30.0,
    "max_body_bytes": 16 * 1024 * 1024,
    "max_buffered": 10_000,
}


def _settings(options: Mapping[str, Any], **more_defaults: Any) -> dict[str, Any]:
    """A transport's settings: the queue defaults (and ``more_defaults``), then ``options``."""
    unknown = set(options) - set(_QUEUE_DEFAULTS) - set(more_defaults)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    settings = {**_QUEUE_DEFAULTS, **more_defaults, **options}
    settings["retry"] = settings["retry"] or RetryPolicy()
    return settings


def _once(cache: dict[str, S], made: S) -> S:
    """The one object per name: the first one made, if its settings are the same."""
    existing = cache.setdefault(made.name, made)
    if existing.settings != made.settings:
        raise ConfigError(
            f"{made!r} is already open with other settings {existing.settings}; configure it once and reuse the object"
        )
    return existing


@dataclasses.dataclass(frozen=True)
class Sentinels:
    """Where to find a master through Redis Sentinel: ``connect(Sentinels("mymaster",
    [("10.0.0.1", 26379), ...]))``. Connections go to the master the sentinels report,
    and to the new one after a failover. ``password``/``username`` are the master's;
    ``sentinel_password`` the sentinels' own, if they have one."""

    service: str
    addresses: Sequence[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def _refuse_decoding(connection_kwargs: dict[str, Any], source: str, *, ours: bool = False) -> None:
    """aioredmq reads bytes. A URL's query reaches the connection as text, where even
    "False" is true (redis-py's asyncio pool does not parse it): read it as a flag."""
    value = connection_kwargs.get("decode_responses")
    if ours and isinstance(value, str) and value.strip().upper() in ("", "0", "F", "FALSE", "N", "NO"):
        connection_kwargs["decode_responses"] = False
        return
    if value:
        raise ConfigError(
            f"{source} asks for decode_responses=True; aioredmq needs bytes (message bodies are "
            "binary): leave decode_responses out (or False)"
        )


def connect(
    url_or_client: str | AnyRedis | Sentinels,
    *,
    prefix: str = "aioredmq",
    socket_timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
    max_connections: int = 64,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    cluster: bool = False,
    sharded_channels: bool | None = None,
    close_timeout_s: float = 10.0,
) -> Client:
    """Connect to Redis by URL (``redis://``, ``rediss://``, ``unix://``) or with a client.
    ``cluster=True``: the URL names one node of a Redis Cluster (or pass a ``RedisCluster``).
    ``sharded_channels``: channels use sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis
    7+); the default is yes on a cluster of Redis 7+, where plain pub/sub copies every
    message to every node, and no elsewhere.

    Use it as ``async with aioredmq.connect(url) as mq: ...``. A client you pass in is
    used as it is (including its retry policy) and stays open after ``mq`` closes.
    ``metrics`` and ``tracing`` receive what the library does (see :mod:`aioredmq.observe`).
    ``close_timeout_s``: how long closing waits for buffered publishes to be confirmed.
    """
    common: dict[str, Any] = {
        "prefix": prefix,
        "metrics": metrics,
        "tracing": tracing,
        "sharded_channels": sharded_channels,
        "close_timeout_s": close_timeout_s,
    }
    if isinstance(url_or_client, Sentinels):
        s = url_or_client
        if not s.addresses:
            raise ConfigError("Sentinels needs at least one sentinel address")
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            list(s.addresses),
            socket_timeout=connect_timeout_s,
            sentinel_kwargs={"password": s.sentinel_password, "socket_timeout": connect_timeout_s},
        )
        master = sentinel.master_for(
            s.service,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            retry=_no_retry(),
            retry_on_error=[],
            username=s.username,
            password=s.password,
        )
        master.connection_pool.connection_class = _fast(master.connection_pool.connection_class)
        client = Client(master, owned=True, **common)
        client._also_close.extend(sentinel.sentinels)
        return client
    if isinstance(url_or_client, RedisCluster):
        _refuse_decoding(url_or_client.connection_kwargs, "the client passed to connect()")
        return Client(url_or_client, owned=False, **common)
    if isinstance(url_or_client, Redis):
        _refuse_decoding(url_or_client.connection_pool.connection_kwargs, "the client passed to connect()")
        return Client(url_or_client, owned=False, **common)
    if not isinstance(url_or_client, str):
        raise ConfigError(f"url_or_client={url_or_client!r} must be a redis:// URL or a redis.asyncio.Redis")
    check_positive("socket_timeout_s", socket_timeout_s)
    check_positive("connect_timeout_s", connect_timeout_s)
    check_positive("max_connections", max_connections, integer=True)
    if cluster:
        try:
            rc = RedisCluster.from_url(
                url_or_client,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=connect_timeout_s,
                max_connections=max_connections,
            )
        except ValueError as exc:
            raise ConfigError(f"url_or_client={url_or_client!r} is not a valid Redis URL: {exc}") from exc
        _refuse_decoding(rc.connection_kwargs, "the URL", ours=True)
        return Client(rc, owned=True, **common)
    try:
        # A pool that makes a caller wait for a free connection: redis-py's plain pool
        # raises past max_connections, which failed healthy messages (an idempotency check,
        # an ack) under load. timeout=None: no deadline of the pool's own; every command
        # still has the socket timeout once it has a connection.
        pool = BlockingConnectionPool.from_url(
            url_or_client,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            timeout=None,
            retry=_no_retry(),
            retry_on_error=[],
        )
    except ValueError as exc:
        raise ConfigError(f"url_or_client={url_or_client!r} is not a valid Redis URL: {exc}") from exc
    _refuse_decoding(pool.connection_kwargs, "the URL", ours=True)
    pool.connection_class = _fast(pool.connection_class)
    redis = Redis.from_pool(pool)
    return Client(redis, owned=True, **common)
