"""The Gate iterators wait at: n arrivals let n waiters through, not all of them."""

from __future__ import annotations

import asyncio

import anyio

from aioredmq.tasks import Gate


async def test_a_gate_lets_one_waiter_through_per_item_and_all_on_open_all() -> None:
    gate = Gate()
    passed: list[int] = []

    async def waiter(i: int) -> None:
        await gate.wait()
        passed.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
        await anyio.sleep(0.01)
        gate.open(1)
        await anyio.sleep(0.01)
        assert passed == [0], "one item, one waiter: the one that waited longest"
        gate.open(5)  # more than are waiting: the rest are not kept for later
        await anyio.sleep(0.01)
        assert passed == [0, 1, 2]
        tg.start_soon(waiter, 3)
        await anyio.sleep(0.01)
        assert passed == [0, 1, 2], "an earlier open is not banked"
        gate.open_all()
    assert passed == [0, 1, 2, 3]


async def test_a_waiter_cancelled_after_its_wake_passes_it_on() -> None:
    """asyncio.wait_for and Task.cancel() may cancel a waiter already let through (anyio
    waits for its next checkpoint instead): the item must not be left with nobody awake."""
    gate = Gate()
    passed: list[str] = []

    async def waiter(name: str) -> None:
        await gate.wait()
        passed.append(name)

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0.01)
    doomed = asyncio.create_task(waiter("cancelled"))
    await asyncio.sleep(0.01)
    third = asyncio.create_task(waiter("third"))
    await asyncio.sleep(0.01)
    gate.open(2)  # the two oldest are let through; one is cancelled before it runs
    doomed.cancel()
    await asyncio.wait_for(asyncio.gather(first, third), 2)  # without the pass-on, third never wakes
    await asyncio.gather(doomed, return_exceptions=True)
    assert doomed.cancelled()
    assert passed == ["first", "third"], "the cancelled waiter's wake went to the next one"
