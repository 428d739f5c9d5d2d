"""Typed bodies: a dataclass, a pydantic model or a msgspec Struct, validated on read.

``assert_type`` lines are checked by mypy (the suite is type-checked): ``msg.body`` has
the declared type without a cast.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, assert_type

import anyio
import msgspec
import pydantic
import pytest

import aioredmq

from .helpers import mq_url


@dataclasses.dataclass
class Shipment:
    order: int
    items: list[str]
    at: datetime


class Invoice(pydantic.BaseModel):
    order: int
    total: float


class Refund(msgspec.Struct):
    order: int
    reason: str


async def take(queue: aioredmq.Queue[Any], n: int) -> list[aioredmq.Message[Any]]:
    got: list[aioredmq.Message[Any]] = []
    async with queue.consume(block_s=0.1) as consumer:
        with anyio.fail_after(10):
            async for msg in consumer:
                got.append(msg)
                await msg.ack()
                if len(got) == n:
                    break
    return got


@pytest.mark.parametrize(
    ("body_type", "good", "bad_dict"),
    [
        (Shipment, Shipment(7, ["tea"], datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)), {"order": "seven", "items": []}),
        (Invoice, Invoice(order=7, total=12.5), {"order": 7}),
        (Refund, Refund(order=7, reason="broken"), {"order": 7, "reason": 3}),
    ],
)
async def test_a_typed_queue_round_trips_its_type_and_dead_letters_what_does_not_match(
    mq: aioredmq.Client, body_type: type[Any], good: Any, bad_dict: dict[str, Any]
) -> None:
    typed = mq.queue(f"typed-{body_type.__name__}", body=body_type)
    with pytest.raises(TypeError, match=f"bodies are {body_type.__name__}"):
        await typed.publish({"order": 7})  # a dict is not the declared type: nothing is sent
    # An untyped client of the same queue (an older service, say) sends a matching dict and a bad one.
    async with aioredmq.connect(mq_url(mq)) as other:
        plain = other.queue(f"typed-{body_type.__name__}")
        await typed.publish(good)
        await plain.publish(bad_dict)
        await plain.publish(_builtins(good))
    got = await take(typed, 2)
    assert [type(m.body) for m in got] == [body_type, body_type]
    assert got[0].body == good
    assert got[1].body == good, "a matching dict from an untyped writer reads as the type"
    (record,) = await typed.dead_letters()
    assert f"body does not match {body_type.__name__}" in record.reason


def _builtins(value: Any) -> Any:
    return msgspec.to_builtins(value) if not isinstance(value, pydantic.BaseModel) else value.model_dump(mode="json")


async def test_typing_flows_to_the_message_body(mq: aioredmq.Client) -> None:
    invoices = mq.queue("typed-flow", body=Invoice)
    assert_type(invoices, aioredmq.Queue[Invoice])
    await invoices.publish(Invoice(order=1, total=2.0))
    async with invoices.consume(block_s=0.1) as consumer:
        async for msg in consumer:
            assert_type(msg.body, Invoice)
            assert msg.body.total == 2.0
            await msg.ack()
            break
    events = mq.stream("typed-flow-s", body=Refund)
    assert_type(events, aioredmq.Stream[Refund])
    assert_type(mq.queue("untyped"), aioredmq.Queue[Any])


async def test_a_body_type_is_part_of_the_queue_settings(mq: aioredmq.Client) -> None:
    mq.queue("typed-settings", body=Invoice)
    with pytest.raises(aioredmq.ConfigError, match="already open with other settings"):
        mq.queue("typed-settings", body=Refund)
    with pytest.raises(aioredmq.ConfigError, match="dataclass, a pydantic model or a msgspec Struct"):
        mq.queue("typed-bad", body=int)
