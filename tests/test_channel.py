"""Pub/sub channels against a real redis-server: fan-out, patterns, reconnects, slow subscribers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.testing import RedisServer

from .helpers import wait_for
from .proxy import FaultProxy


async def take(sub: aioredmq.Subscription[object], n: int, timeout_s: float = 5.0) -> list[aioredmq.Broadcast[object]]:
    out: list[aioredmq.Broadcast[object]] = []
    with anyio.fail_after(timeout_s):
        async for m in sub:
            out.append(m)
            if len(out) == n:
                break
    return out


async def test_every_subscriber_gets_every_message_in_order(mq: aioredmq.Client) -> None:
    news = mq.channel("news")
    async with news.subscribe() as a, news.subscribe() as b, mq.subscribe("news", "other") as c:
        for i in range(50):
            assert await news.publish({"n": i}, headers={"h": "v"}) == 3
        for sub in (a, b, c):
            got = await take(sub, 50)
            assert [m.body for m in got] == [{"n": i} for i in range(50)]
            assert all(m.channel == "news" and m.headers == {"h": "v"} and not m.gap for m in got)
            assert len({m.id for m in got}) == 50
    assert await news.publish("nobody") == 0  # at most once: no subscriber, nobody gets it


async def test_a_pattern_subscription_gets_the_channels_it_matches(mq: aioredmq.Client) -> None:
    async with mq.subscribe(patterns=["news.*"]) as sub, mq.subscribe("weather", patterns=["x?"]) as other:
        await mq.channel("news.sports").publish(1)
        await mq.channel("weather").publish(2)
        await mq.channel("news.tech").publish(3)
        await mq.channel("xy").publish(4)
        got = await take(sub, 2)
        assert [(m.channel, m.body) for m in got] == [("news.sports", 1), ("news.tech", 3)]
        assert [(m.channel, m.body) for m in await take(other, 2)] == [("weather", 2), ("xy", 4)]
        assert sub.pending == 0


async def test_it_resubscribes_after_the_connection_is_killed_and_flags_the_gap(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    channel = mq.channel("alerts")
    async with channel.subscribe() as sub:
        await channel.publish("before")
        assert [m.body for m in await take(sub, 1)] == ["before"]
        assert await raw.client_kill_filter(_type="pubsub") == 1
        await wait_for(lambda: sub.stats.reconnects == 1, what="the subscription to reconnect")
        await channel.publish("after")
        (after,) = await take(sub, 1)
        assert (after.body, after.gap) == ("after", True)
        await channel.publish("next")
        (nxt,) = await take(sub, 1)
        assert (nxt.body, nxt.gap) == ("next", False)
        assert sub.stats.gaps == 1


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


async def test_a_silent_dead_link_is_found_by_the_keepalive(proxy: FaultProxy) -> None:
    async with aioredmq.connect(proxy.url) as mq:
        channel = mq.channel("beat")
        async with channel.subscribe(keepalive_s=0.2) as sub:
            proxy.pause()  # no reset, no reply: only the missing PONG tells
            await wait_for(lambda: sub.stats.connection_losses == 1, what="the dead link to be dropped")
            proxy.resume()
            await wait_for(lambda: sub.stats.reconnects == 1, what="the subscription to reconnect")
            await channel.publish("back")
            (m,) = await take(sub, 1)
            assert (m.body, m.gap) == ("back", True)


async def test_a_slow_subscriber_drops_the_oldest_and_flags_the_gap(mq: aioredmq.Client) -> None:
    channel = mq.channel("firehose")
    async with channel.subscribe(max_pending=5) as sub:
        for i in range(20):
            await channel.publish(i)
        await wait_for(lambda: sub.stats.received == 20, what="every message to arrive")
        assert sub.pending == 5  # memory stays bounded however far behind it is
        got = await take(sub, 5)
        assert [m.body for m in got] == [15, 16, 17, 18, 19]
        assert [m.gap for m in got] == [True, False, False, False, False]
        assert (sub.stats.dropped, sub.stats.gaps) == (15, 1)


async def test_a_slow_subscriber_can_be_disconnected_instead(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    channel = mq.channel("firehose")
    async with channel.subscribe(max_pending=3, overflow="disconnect") as sub:
        for i in range(5):
            await channel.publish(i)
        await wait_for(lambda: sub.stats.received == 4, what="the overflow")
        got = [m.body for m in await take(sub, 3)]
        assert got == [0, 1, 2]  # what was buffered is still handed out first
        with pytest.raises(aioredmq.SlowSubscriberError, match="fell 3 messages behind"):
            await sub.__anext__()
    assert await raw.pubsub_numsub("aioredmq:{firehose}:channel") == [(b"aioredmq:{firehose}:channel", 0)]


async def test_undecodable_messages_are_skipped(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    channel = mq.channel("mixed")
    async with channel.subscribe() as sub:
        await raw.publish("aioredmq:{mixed}:channel", b"not an envelope")
        await mq.channel("mixed", codec="raw").publish(b"wrong codec")
        await channel.publish("fine")
        (m,) = await take(sub, 1)
        assert m.body == "fine"
        assert sub.stats.undecodable == 2


async def test_bad_arguments_and_closed_use(mq: aioredmq.Client) -> None:
    with pytest.raises(aioredmq.ConfigError, match="channel"):
        mq.channel("bad name")
    with pytest.raises(aioredmq.ConfigError, match="pattern"):
        mq.subscribe(patterns=["a{b}"])
    with pytest.raises(aioredmq.ConfigError, match="at least one"):
        mq.subscribe()
    with pytest.raises(aioredmq.ConfigError, match="overflow"):
        mq.subscribe("a", overflow="grow")  # type: ignore[arg-type]
    with pytest.raises(aioredmq.ConfigError, match="max_pending"):
        mq.subscribe("a", max_pending=0)
    with pytest.raises(aioredmq.MessageTooLargeError):
        await mq.channel("a", max_body_bytes=10).publish("x" * 100)
    sub = mq.subscribe("a")
    with pytest.raises(aioredmq.ClosedError, match="not open"):
        await sub.__anext__()
    async with sub:
        await mq.channel("a").publish("buffered")
        await wait_for(lambda: sub.pending == 1, what="the message to be buffered")
    assert sub.pending == 0, "closing discards what was buffered"
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    with pytest.raises(aioredmq.ClosedError, match="only once"):
        await sub.__aenter__()


async def test_closing_the_client_closes_its_subscriptions(redis_url: str, raw: aioredis.Redis) -> None:
    async with aioredmq.connect(redis_url) as mq:
        sub = await mq.subscribe("a", "b").__aenter__()
        assert await raw.pubsub_numsub("aioredmq:{a}:channel") == [(b"aioredmq:{a}:channel", 1)]
    assert sub.closed
    assert await raw.pubsub_numsub("aioredmq:{a}:channel") == [(b"aioredmq:{a}:channel", 0)]


async def test_sharded_channels_on_one_server(redis_url: str) -> None:
    """``sharded_channels=True`` outside a cluster (Redis 7+): SPUBLISH reaches shard
    subscribers only, on one connection for all channels; patterns are refused."""
    async with aioredmq.connect(redis_url, sharded_channels=True) as sharded, aioredmq.connect(redis_url) as plain:
        assert not await plain.channels_sharded()
        async with sharded.subscribe("s-a", "s-b") as sub, plain.subscribe("s-a") as unsharded:
            assert len(sub._links) == 1
            assert await sharded.channel("s-a").publish(1) == 1  # the plain subscriber does not count
            assert await sharded.channel("s-b").publish(2) == 1
            assert [m.body for m in await take(sub, 2)] == [1, 2]
            assert await plain.channel("s-a").publish(3) == 1  # and PUBLISH reaches only it
            assert [m.body for m in await take(unsharded, 1)] == [3]
        with pytest.raises(aioredmq.ConfigError, match="sharded_channels=False"):
            async with sharded.subscribe(patterns=["s-*"]):
                pass
    with pytest.raises(aioredmq.ConfigError, match="sharded_channels"):
        aioredmq.connect(redis_url, sharded_channels="yes")  # type: ignore[arg-type]
