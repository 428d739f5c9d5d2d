"""The Lua scripts on their own: what each does at its edges.

Against the real server, except the publish script's dedupe, whose commands
(GET, SET PX, LPUSH) fakeredis runs faithfully.
"""

from __future__ import annotations

import fakeredis
import pytest
import redis.asyncio as aioredis

from aioredmq.envelope import decode, decode_dead, encode
from aioredmq.ids import new_id
from aioredmq.keys import QueueKeys
from aioredmq.scripts import script

from .helpers import lindex_bytes, lrange_bytes, stream_entries

K = QueueKeys("aioredmq", "s")


def envelope(attempts: int = 0) -> bytes:
    return encode(new_id(), attempts, 1, "json", None, b"1")


async def reap(raw: aioredis.Redis, consumer: str, max_deliveries: int = 3, keep_ms: int = 1000) -> list[int]:
    keys = (K.leases, K.inflight(consumer), K.ready, K.dead, K.registry)
    result: list[int] = await script("reap")(raw, keys, (consumer, max_deliveries, keep_ms, 0))
    return result


async def test_reap_leaves_a_live_consumer_alone(raw: aioredis.Redis) -> None:
    await raw.zadd(K.leases, {"alive": 2**50})
    await raw.lpush(K.inflight("alive"), envelope())
    assert await reap(raw, "alive") == [-1, 0]
    assert await raw.llen(K.inflight("alive")) == 1


async def test_reap_returns_in_order_counts_and_dead_letters(raw: aioredis.Redis) -> None:
    await raw.rpush(K.ready, b"next-in-line-before")
    fresh, last_try = envelope(0), envelope(2)
    # In-flight holds oldest at the right: fresh (oldest), garbage, last_try (newest).
    await raw.lpush(K.inflight("gone"), fresh, b"\x00garbage", last_try)
    await raw.zadd(K.leases, {"gone": 1})
    assert await reap(raw, "gone") == [1, 2]
    front = await lindex_bytes(raw, K.ready, -1)
    assert front is not None
    assert (decode(front).id, decode(front).attempts) == (decode(fresh).id, 1)
    reasons = sorted(decode_dead(r).reason for r in await lrange_bytes(raw, K.dead))
    assert "delivered 3 times (max_deliveries=3)" in reasons[0]
    assert reasons[1].startswith("not an aioredmq envelope")
    assert not await raw.exists(K.inflight("gone"))
    assert await raw.zscore(K.leases, "gone") == 1, "kept a while: a late BLMOVE may still land"


async def test_reap_forgets_an_expired_empty_lease_after_the_grace(raw: aioredis.Redis) -> None:
    await raw.zadd(K.leases, {"long-gone": 1})
    assert await reap(raw, "long-gone") == [0, 0]
    assert await raw.zscore(K.leases, "long-gone") is None


async def test_heartbeat_renews_tells_the_next_due_time_and_names_expired_consumers(raw: aioredis.Redis) -> None:
    await raw.zadd(K.delayed, {"later": 2**50})
    await raw.zadd(K.leases, {"expired": 1, "alive": 2**50})
    await raw.lpush(K.inflight("me"), b"one", b"two")
    keys = (K.leases, K.delayed, K.inflight("me"), K.registry)
    next_ms, in_flight, lapsed, *expired = await script("heartbeat")(raw, keys, ("me", 5000, 16))
    assert in_flight == 2
    assert next_ms > 10**9
    assert lapsed == 1, "no lease entry before the first beat"
    assert expired == [b"expired"]
    assert await raw.zscore(K.leases, "me") is not None
    assert (await script("heartbeat")(raw, keys, ("me", 5000, 16)))[2] == 0, "renewed in time"
    await raw.zadd(K.leases, {"me": 1})
    assert (await script("heartbeat")(raw, keys, ("me", 5000, 16)))[2] == 1, "renewed after it lapsed"
    assert await raw.zcard(K.delayed) == 1, "a heartbeat moves nothing"


async def schedule(raw: aioredis.Redis, seq: int, *pairs: bytes) -> int:
    keys = (K.delayed, K.producer("p"), K.scheduled)
    applied: int = await script("schedule")(raw, keys, (seq, 60_000, K.due, *pairs))
    return applied


async def test_schedule_applies_a_batch_once_and_announces_a_new_earliest_due_time(raw: aioredis.Redis) -> None:
    a, b, c = envelope(), envelope(), envelope()
    async with raw.pubsub() as notices:
        await notices.subscribe(K.due)
        await notices.get_message(timeout=1)  # the subscribe confirmation
        assert await schedule(raw, 1, b"+60000", a, b"=1", b) == 2
        assert await schedule(raw, 1, b"+60000", a, b"=1", b) == -1, "a resend is dropped"
        assert await schedule(raw, 2, b"+30000", c) == 1
        first = await notices.get_message(timeout=1)
        assert first is not None
        assert first["data"] == b"0", "b is overdue: due now"
        assert await notices.get_message(timeout=0.2) is None, "c is not the earliest: no notice"
    head = await raw.zrange(K.delayed, 0, 0, withscores=True)
    assert head == [(decode(b).id.encode(), 1.0)]
    assert await raw.hget(K.scheduled, decode(a).id) == a
    assert await raw.hlen(K.scheduled) == 3


async def test_promote_moves_only_what_is_due_and_only_once(raw: aioredis.Redis) -> None:
    due1, due2, later = envelope(), envelope(), envelope()
    await schedule(raw, 1, b"=1", due1, b"=2", due2, b"+60000", later)
    keys = (K.delayed, K.scheduled, K.ready)
    assert await script("promote")(raw, keys, ("list", 1)) == [1, 0], "more is due at once"
    moved, next_ms = await script("promote")(raw, keys, ("list", 100))
    assert moved == 1
    assert 50_000 < next_ms <= 60_000
    again, next_again = await script("promote")(raw, keys, ("list", 100))
    assert (again, 0 < next_again <= next_ms) == (0, True), "nothing moves twice, nothing early"
    assert await lrange_bytes(raw, K.ready) == [due2, due1]
    assert await raw.hkeys(K.scheduled) == [decode(later).id.encode()]
    stream_keys = (K.delayed, K.scheduled, "aioredmq:{s}:stream")
    await raw.zadd(K.delayed, {decode(later).id: 1})
    assert (await script("promote")(raw, stream_keys, ("stream", 100)))[0] == 1
    assert [fields for _, fields in await stream_entries(raw, "aioredmq:{s}:stream")] == [{b"m": later}]
    assert await raw.zcard(K.delayed) == 0


def test_publish_applies_a_batch_once_per_sequence() -> None:
    r = fakeredis.FakeStrictRedis()
    publish = r.register_script(script("publish").source)
    ready, seq = K.ready, K.producer("p1")
    assert publish(keys=[ready, seq], args=[1, 60_000, b"a", b"b"]) == 2
    assert publish(keys=[ready, seq], args=[1, 60_000, b"a", b"b"]) == -1, "a resend is dropped"
    assert publish(keys=[ready, seq], args=[2, 60_000, b"c"]) == 1
    assert r.lrange(ready, 0, -1) == [b"c", b"b", b"a"]
    assert 0 < r.pttl(seq) <= 60_000


@pytest.mark.parametrize("n", [1, 3999, 4000, 4001, 9000])
async def test_publish_and_take_handle_batches_past_the_lua_stack_limit(raw: aioredis.Redis, n: int) -> None:
    envs = [envelope() for _ in range(n)]
    assert await script("publish")(raw, (K.ready, K.producer("big")), (1, 1000, *envs)) == n
    taken = await script("take")(raw, (K.ready, K.inflight("c"), K.leases, K.registry), (n + 5, "c", 1000))
    assert taken == envs, "oldest first"
    assert await raw.lrange(K.inflight("c"), -1, -1) == [envs[0]], "oldest at the right"


async def settle(raw: aioredis.Redis, consumer: str, acks: list[bytes], *others: bytes | int) -> list[int]:
    keys = (K.inflight(consumer), K.ready, K.delayed, K.dead, K.scheduled, K.done)
    late: list[int] = await script("settle")(raw, keys, (len(acks), *acks, *others))
    return late


def tag(env: bytes) -> bytes:
    return b" ".join(env.split(b" ")[1:3])


async def test_settle_trims_in_order_acks_and_finds_the_rest_anywhere(raw: aioredis.Redis) -> None:
    envs = [envelope(i % 2) for i in range(6)]
    await raw.lpush(K.inflight("c"), *envs)  # oldest (envs[0]) at the right
    # In order from the oldest end, then one out of order, one unknown, one acked twice.
    stranger = envelope()
    acks = [tag(envs[0]), tag(envs[1]), tag(envs[4]), tag(stranger), tag(envs[1])]
    # A front-return of envs[2] rides along; its position follows the acks.
    late = await settle(raw, "c", acks, envs[2], b"F", envs[2], 0)
    assert late == [4, 5], "the unknown ack and the repeated one are late"
    assert await lrange_bytes(raw, K.inflight("c")) == [envs[5], envs[3]]
    assert await lrange_bytes(raw, K.ready) == [envs[2]]
    # Everything acked in order in one call leaves an empty list (the key is gone).
    assert await settle(raw, "c", [tag(envs[3]), tag(envs[5])]) == []
    assert not await raw.exists(K.inflight("c"))
    # A tag must name the attempt too: an ack of an older delivery of the same message is late.
    retried = envelope(1)
    await raw.lpush(K.inflight("c"), retried)
    older = decode(retried).id.encode() + b" 0"
    assert await settle(raw, "c", [older]) == [1]
    assert await raw.llen(K.inflight("c")) == 1
