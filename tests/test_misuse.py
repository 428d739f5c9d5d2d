"""Common mistakes get a clear error at once, before anything reaches Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.testing import RedisServer, free_port

from .helpers import wait_for

pytestmark = pytest.mark.timeout(60)


async def test_every_call_of_a_closed_client_raises_closed_error(redis_url: str, raw: aioredis.Redis) -> None:
    """stats, peek, dead_letters, requeue_dead, purge_dead, trim and create_group reached
    Redis after the client closed (a group was created)."""
    async with aioredmq.connect(redis_url) as mq:
        queue, stream, pq = mq.queue("m-closed"), mq.stream("m-closed"), mq.partitioned("m-closed-p", partitions=2)
        channel = mq.channel("m-closed")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "queue.publish": lambda: queue.publish({"n": 1}),
        "queue.publish_many": lambda: queue.publish_many([{"n": 1}]),
        "queue.stats": queue.stats,
        "queue.peek": queue.peek,
        "queue.dead_letters": queue.dead_letters,
        "queue.requeue_dead": queue.requeue_dead,
        "queue.purge_dead": queue.purge_dead,
        "queue.cancel": lambda: queue.cancel("0" * 26),
        "stream.publish": lambda: stream.publish({"n": 1}),
        "stream.create_group": lambda: stream.create_group("g"),
        "stream.trim": stream.trim,
        "stream.stats": stream.stats,
        "stream.peek": stream.peek,
        "stream.dead_letters": lambda: stream.dead_letters("g"),
        "stream.requeue_dead": lambda: stream.requeue_dead("g"),
        "stream.purge_dead": lambda: stream.purge_dead("g"),
        "partitioned.publish": lambda: pq.publish({"n": 1}, key="k"),
        "partitioned.publish_many": lambda: pq.publish_many([("k", {"n": 1})]),
        "partitioned.stats": pq.stats,
        "partitioned.cancel": lambda: pq.cancel("0" * 26),
        "channel.publish": lambda: channel.publish({"n": 1}),
    }
    reached = []
    for what, call in calls.items():
        try:
            await call()
        except aioredmq.ClosedError:
            continue
        reached.append(what)
    assert not reached, f"these ran on a closed client: {reached}"
    assert await raw.keys("*") == [], "a call on the closed client wrote to Redis"


async def test_iterating_a_consumer_whose_client_closed_raises_closed_error(redis_url: str) -> None:
    mq = aioredmq.connect(redis_url)
    await mq.__aenter__()
    consumer = mq.queue("m-iter").consume(block_s=0.2)
    await consumer.__aenter__()
    got: list[BaseException] = []

    async def iterate() -> None:
        try:
            async for _ in consumer:
                pass
        except aioredmq.ClosedError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(iterate)
        await anyio.sleep(0.1)
        await mq.aclose()
    assert got, "the iteration ended quietly when its client closed"
    with pytest.raises(aioredmq.ClosedError):
        await anext(consumer)


async def test_a_consumer_closed_by_its_own_context_ends_its_iteration_quietly(mq: aioredmq.Client) -> None:
    async with mq.queue("m-own").consume(block_s=0.2) as consumer:
        pass
    with pytest.raises(StopAsyncIteration):
        await anext(consumer)


@pytest.mark.parametrize("bodies", ["abc", b"abc", {"order": 1}], ids=["str", "bytes", "dict"])
async def test_publish_many_refuses_a_single_body(mq: aioredmq.Client, raw: aioredis.Redis, bodies: Any) -> None:
    """publish_many("abc") published "a", "b", "c"; a dict published its keys."""
    with pytest.raises(TypeError, match="publish_many"):
        await mq.queue("m-many").publish_many(bodies)
    with pytest.raises(TypeError, match="publish_many"):
        await mq.stream("m-many").publish_many(bodies)
    with pytest.raises(TypeError, match="publish_many"):
        await mq.partitioned("m-many-p", partitions=2).publish_many(bodies)
    assert await raw.keys("*") == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_floats_are_refused_naming_the_field(
    mq: aioredmq.Client, raw: aioredis.Redis, value: float
) -> None:
    """NaN and Infinity went out as JSON that other languages cannot read."""
    queue = mq.queue("m-nan")
    with pytest.raises(TypeError, match=r"""\["lines"\]\[1\]\["price"\]"""):
        await queue.publish({"lines": [{"price": 1.0}, {"price": value}]})
    with pytest.raises(TypeError, match="not valid JSON"):
        await queue.publish_many([{"n": 1}, value])
    with pytest.raises(TypeError, match="not valid JSON"):
        await mq.channel("m-nan").publish({"x": value})
    assert await raw.keys("*") == []
    await queue.publish({"price": 1e308})  # large but finite is fine


@dataclasses.dataclass
class Shipment:
    weight: int
    items: list[str]


async def test_a_typed_body_that_would_not_decode_is_refused_at_publish(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A typed queue published Shipment("seven", ["tea"]) and dead-lettered it later."""
    pytest.importorskip("msgspec")
    queue = mq.queue("m-typed", body=Shipment)
    with pytest.raises(TypeError, match="Shipment"):
        await queue.publish(Shipment("seven", ["tea"]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Shipment"):
        await queue.publish_many([Shipment(1, ["tea"]), Shipment(2, [3])])  # type: ignore[list-item]
    assert await raw.keys("*") == []
    await queue.publish(Shipment(7, ["tea"]))
    async with queue.consume() as consumer:
        msg = await anext(consumer)
        assert msg.body == Shipment(7, ["tea"])
        await msg.ack()


async def test_decode_responses_in_the_url_is_refused(redis_url: str) -> None:
    """consume() hung and stats() crashed with AttributeError."""
    with pytest.raises(aioredmq.ConfigError, match="decode_responses"):
        aioredmq.connect(redis_url + "?decode_responses=True")
    with pytest.raises(aioredmq.ConfigError, match="decode_responses"):
        aioredmq.connect(redis_url + "?decode_responses=yes", cluster=True)


def plain(msg: aioredmq.Message[Any]) -> None:
    pass


class SyncCallable:
    def __call__(self, msg: aioredmq.Message[Any]) -> None:
        pass


async def async_handler(msg: aioredmq.Message[Any]) -> None:
    pass


class AsyncCallable:
    async def __call__(self, msg: aioredmq.Message[Any]) -> None:
        pass


@pytest.mark.parametrize(
    "handler",
    ["not a function", plain, lambda msg: None, SyncCallable(), None],
    ids=["str", "def", "lambda", "sync-callable", "none"],
)
async def test_run_refuses_a_handler_that_is_not_async_before_taking_anything(
    mq: aioredmq.Client, handler: Any
) -> None:
    """mq.run(queue, "not a function") dead-lettered every message and never returned; a
    plain def ran its side effects 5 times before its message was dead-lettered."""
    queue = mq.queue("m-handler")
    await queue.publish({"n": 1})
    with anyio.fail_after(5), pytest.raises(TypeError, match="async"):
        await mq.run(queue, handler)
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight, stats.dead) == (1, 0, 0)


@pytest.mark.parametrize(
    "handler",
    [async_handler, AsyncCallable(), __import__("functools").partial(async_handler)],
    ids=["async-def", "async-callable", "partial"],
)
async def test_run_takes_every_kind_of_async_handler(mq: aioredmq.Client, handler: Any) -> None:
    queue = mq.queue("m-handler-ok")
    await queue.publish({"n": 1})
    with anyio.move_on_after(0.5):
        await mq.run(queue, handler)
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0)


async def test_decode_responses_false_in_the_url_reads_bytes(redis_url: str) -> None:
    """The asyncio pool passes a URL's "False" on as a string, which is true."""
    async with aioredmq.connect(redis_url + "?decode_responses=False") as mq:
        queue = mq.queue("m-decode")
        await queue.publish({"n": 1})
        assert (await queue.stats()).ready == 1
        async with queue.consume() as consumer:
            msg = await anext(consumer)
            assert msg.body == {"n": 1}
            await msg.ack()


async def test_nothing_listening_is_a_definite_error_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """publish retried 18 times with 18 warnings, then said the message "may or may not be
    queued" although nothing was sent; stats said "lost the connection" with a key list."""
    port = free_port()
    async with aioredmq.connect(f"redis://127.0.0.1:{port}") as mq:
        queue = mq.queue("m-refused")
        with pytest.raises(aioredmq.ConnectError) as stats_error:
            await queue.stats()
        assert f"could not connect to Redis: Error 111 connecting to 127.0.0.1:{port}" in str(stats_error.value)
        assert "keys:" not in str(stats_error.value)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, "aioredmq"), pytest.raises(aioredmq.PublishNotSentError) as sent:
            await queue.publish({"n": 1})
        assert isinstance(sent.value, aioredmq.PublishError)
        assert "cannot duplicate" in str(sent.value)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        waits = [r for r in caplog.records if r.levelno == logging.DEBUG and "resending" in r.getMessage()]
        delays = [float(r.getMessage().split(" in ")[1].split("s ")[0]) for r in waits]
        assert delays == sorted(delays), f"no back-off: {delays}"
        assert delays[-1] > 2 * delays[0], f"no back-off: {delays}"


async def test_a_port_that_is_not_redis_says_so_in_one_line() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    async with server, aioredmq.connect(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}") as mq:
        with pytest.raises(aioredmq.ConnectionLostError) as error:
            await mq.queue("m-http").stats()
    text = str(error.value)
    assert "does not answer in the Redis protocol" in text
    assert "\n" not in text


async def test_after_an_outage_publishes_succeed_and_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    async with aioredmq.connect(f"redis://127.0.0.1:{port}") as mq:
        queue = mq.queue("m-outage")
        with caplog.at_level(logging.INFO, "aioredmq"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(queue.publish, {"n": 1})
                await anyio.sleep(0.5)  # a few failed tries
                with RedisServer(port=port):
                    await wait_for(lambda: "works again" in caplog.text, 5, "the publish to go through")
                    assert (await queue.stats()).ready == 1
        failed = [r for r in caplog.records if "failed" in r.getMessage() and r.levelno == logging.WARNING]
        assert len(failed) == 1


_OLD_INFO = b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n"


async def _old_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if not line.startswith(b"*"):
                continue
            args = []
            for _ in range(int(line[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2])
            if args[0].upper() == b"INFO":
                writer.write(b"$%d\r\n%b\r\n" % (len(_OLD_INFO), _OLD_INFO))
            elif args[0].upper() == b"HELLO":
                writer.write(b"%2\r\n$5\r\nproto\r\n:3\r\n$7\r\nversion\r\n$6\r\n6.0.16\r\n")
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def test_a_redis_older_than_6_2_is_refused_naming_the_version() -> None:
    """A Redis without BLMOVE or XAUTOCLAIM failed with "unknown command" from inside a
    script. No Redis 6.0 is installed here: a stand-in answers INFO as 6.0.16 would and
    every other command with +OK, so only the version check can refuse."""
    server = await asyncio.start_server(_old_redis, "127.0.0.1", 0)
    async with server, aioredmq.connect(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}") as mq:
        queue = mq.queue("m-old")
        with pytest.raises(aioredmq.ConfigError, match=r"Redis 6\.0\.16 is too old: aioredmq needs Redis 6\.2"):
            await queue.publish({"n": 1})
        mq.server_checked = False
        with pytest.raises(aioredmq.ConfigError, match="too old"), anyio.fail_after(5):
            async with queue.consume():
                pass


async def test_a_consumer_started_before_redis_checks_the_server_it_reaches() -> None:
    """The check is retried with the opening: a worker started while nothing listened
    checked nothing, and met 'unknown command' later."""
    port = free_port()

    async def serve_later() -> None:
        await anyio.sleep(0.5)  # the consumer's first tries find nothing
        async with await asyncio.start_server(_old_redis, "127.0.0.1", port):
            await anyio.sleep_forever()

    async with aioredmq.connect(f"redis://127.0.0.1:{port}") as mq:
        consumer = mq.queue("m-old-later").consume()
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_later)
            with pytest.raises(aioredmq.ConfigError, match="too old"), anyio.fail_after(10):
                await consumer.__aenter__()
            tg.cancel_scope.cancel()


async def test_the_version_check_passes_on_the_server_under_test(mq: aioredmq.Client) -> None:
    await mq.queue("m-version").publish({"n": 1})
    assert mq.server_checked
