"""Connection ownership, retry policy, configuration errors and error translation."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq import ClosedError, ConfigError, RetryPolicy, WrongTypeError

from .helpers import single


async def test_own_clients_never_resend_on_their_own(mq: aioredmq.Client) -> None:
    retry = single(mq.redis).connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == 0
    conn = mq.dedicated(3.0)
    try:
        kwargs = single(conn).connection_pool.connection_kwargs
        assert kwargs["retry"].get_retries() == 0
        assert kwargs["socket_timeout"] == 3.0
    finally:
        await mq.release_dedicated(conn)


async def test_a_client_passed_in_is_used_and_left_open(redis_url: str) -> None:
    own = aioredis.Redis.from_url(redis_url)
    try:
        async with aioredmq.connect(own) as mq:
            await mq.queue("given").publish(1)
        assert await own.llen("aioredmq:{given}:ready") == 1
        assert await own.ping()
    finally:
        await own.aclose()


async def test_closed_client_refuses_work_and_does_not_reopen(redis_url: str) -> None:
    mq = aioredmq.connect(redis_url)
    with pytest.raises(ClosedError, match="not open"):
        mq.queue("x")
    async with mq:
        q = mq.queue("x")
        consumer = q.consume()
    with pytest.raises(ClosedError):
        await q.publish(1)
    with pytest.raises(ClosedError):
        async with consumer:
            pass
    with pytest.raises(ClosedError, match="only once"):
        async with mq:
            pass


async def test_a_consumer_opens_once_and_a_closed_one_stops_iterating(mq: aioredmq.Client) -> None:
    consumer = mq.queue("once").consume(block_s=0.1)
    with pytest.raises(ClosedError, match="not open"):
        await consumer.__anext__()
    async with consumer:
        pass
    with pytest.raises(StopAsyncIteration):
        await consumer.__anext__()
    with pytest.raises(ClosedError, match="only once"):
        async with consumer:
            pass


@pytest.mark.parametrize(
    ("make", "knob"),
    [
        (lambda mq: mq.queue("bad{tag}"), "name="),
        (lambda mq: mq.queue(""), "name="),
        (lambda mq: mq.queue("q", lease_s=0), "lease_s="),
        (lambda mq: mq.queue("q", max_body_bytes=-1), "max_body_bytes="),
        (lambda mq: mq.queue("q", max_buffered=1.5), "max_buffered="),
        (lambda mq: mq.queue("q", codec="pickle"), "codec="),
        (lambda mq: mq.queue("q").consume(prefetch=0), "prefetch="),
        (lambda mq: mq.queue("q").consume(block_s=-1), "block_s="),
        (lambda mq: mq.queue("q").consume(name="a b"), "name="),
    ],
)
async def test_invalid_configuration_names_the_knob(mq: aioredmq.Client, make: object, knob: str) -> None:
    with pytest.raises(ConfigError, match=knob):
        make(mq)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"max_deliveries": 0}, "max_deliveries="),
        ({"backoff_initial_s": -1}, "backoff_initial_s="),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier="),
        ({"max_deliveries": True}, "max_deliveries="),
    ],
)
def test_invalid_retry_policy_names_the_knob(kwargs: dict[str, object], knob: str) -> None:
    with pytest.raises(ConfigError, match=knob):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(backoff_initial_s=1, backoff_max_s=10, backoff_multiplier=2)
    for deliveries, full in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (50, 10)):
        waits = [policy.backoff_s(deliveries) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits)
        assert len(set(waits)) > 1


def test_connect_rejects_what_is_not_a_url_or_client() -> None:
    with pytest.raises(ConfigError, match="url_or_client"):
        aioredmq.connect(6379)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a valid Redis URL"):
        aioredmq.connect("http://example")
    with pytest.raises(ConfigError, match="socket_timeout_s"):
        aioredmq.connect("redis://localhost", socket_timeout_s=0)


async def test_reopening_a_queue_with_other_settings_is_refused(mq: aioredmq.Client) -> None:
    q = mq.queue("same", lease_s=5)
    assert mq.queue("same", lease_s=5) is q
    with pytest.raises(ConfigError, match="other settings"):
        mq.queue("same", lease_s=6)


async def test_a_key_of_the_wrong_type_is_named(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("typed")
    await raw.set(q.keys.ready, "a string")
    with pytest.raises(WrongTypeError, match=r"aioredmq:\{typed\}:ready"):
        await q.publish(1)
    with pytest.raises(WrongTypeError, match="ready"):
        async with q.consume(block_s=0.1) as consumer:
            await consumer.__anext__()


async def test_oversize_message_is_refused_before_anything_is_sent(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("big", max_body_bytes=200)
    await q.publish("x" * 100)
    with pytest.raises(aioredmq.MessageTooLargeError, match="max_body_bytes=200"):
        await q.publish("x" * 300)
    with pytest.raises(aioredmq.MessageTooLargeError):
        await q.publish_many(["ok", "x" * 300])
    assert await raw.llen(q.keys.ready) == 1


async def test_unreachable_server_fails_a_publish_and_makes_a_consumer_wait() -> None:
    """A publish says soon that it was not sent (no try reached Redis); opening a consumer
    waits for Redis (as a worker under a service manager should), until cancelled."""
    from aioredmq.testing import free_port

    async with aioredmq.connect(f"redis://127.0.0.1:{free_port()}", connect_timeout_s=1) as mq:
        q = mq.queue("nowhere")
        with pytest.raises(aioredmq.PublishNotSentError):
            await q.publish(1)
        opened = False
        with anyio.move_on_after(1.0) as waited:
            async with q.consume():
                opened = True
        assert waited.cancelled_caught
        assert not opened
