"""Crash and graceful-stop recovery against a real redis-server.

* A worker process killed with SIGKILL mid-batch loses nothing: its lease expires, a
  live consumer reaps it, and what it held comes back with a raised delivery count.
* SIGTERM on the ``worker`` CLI (and cancelling ``run`` in-process) lets running
  handlers finish and returns never-started prefetched messages at once, with their
  delivery count unchanged, so nothing is handled twice.

No assertion is on timing: every wait is bounded and fails saying what it waited for.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.envelope import decode

from .conftest import PYTHON, ROOT, subprocess_env
from .helpers import lrange_bytes, wait_for, zrange_with_scores
from .ledger import report
from .workers import DONE, STARTED, URL_ENV

pytestmark = pytest.mark.timeout(60)

N_CRASH = 500
N_GRACEFUL = 40


# -- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _output_files(tmp_path: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    with open(tmp_path / "worker.out", "wb") as out, open(tmp_path / "worker.err", "wb") as err:
        yield out, err


def _output(tmp_path: Path) -> str:
    text = []
    for name in ("worker.out", "worker.err"):
        with contextlib.suppress(OSError):
            text.append(f"--- {name} ---\n" + (tmp_path / name).read_text("utf-8", "replace")[-4000:])
    return "\n".join(text)


@contextlib.asynccontextmanager
async def worker_process(
    tmp_path: Path, redis_url: str, handler: str, queue: str, *options: str, source: str = "--queue"
) -> AsyncIterator[anyio.abc.Process]:
    """``python -m aioredmq worker handler --queue queue ...`` (or ``--stream``); killed (by
    its pid) if still running at exit."""
    env = subprocess_env()
    env[URL_ENV] = redis_url
    command = [PYTHON, "-m", "aioredmq", "worker", handler, source, queue, "--url", redis_url, *options]
    with _output_files(tmp_path) as (out, err):
        proc = await anyio.open_process(command, stdin=None, stdout=out, stderr=err, env=env, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            with anyio.move_on_after(10, shield=True):
                await proc.wait()


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Await ``check()`` until true; fail with ``what`` after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while True:
            if await check():
                return
            await anyio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def wait_exit(proc: anyio.abc.Process, timeout_s: float, tmp_path: Path) -> int:
    with anyio.move_on_after(timeout_s):
        return await proc.wait()
    raise AssertionError(f"worker pid {proc.pid} did not exit within {timeout_s}s\n{_output(tmp_path)}")


async def records(raw: aioredis.Redis, key: str) -> list[tuple[str, int]]:
    """The ``"<id> <deliveries>"`` entries a handler pushed to ``key``, in order."""
    return [(i.decode(), int(d)) for i, d in (e.split() for e in await lrange_bytes(raw, key))]


async def ready_envelopes(raw: aioredis.Redis, queue: aioredmq.Queue[Any]) -> list[Any]:
    """The ready list's envelopes, next-in-line first."""
    return [decode(r) for r in reversed(await lrange_bytes(raw, queue.keys.ready))]


async def lease_of_only_consumer(raw: aioredis.Redis, queue: aioredmq.Queue[Any]) -> tuple[str, float]:
    leases = await zrange_with_scores(raw, queue.keys.leases)
    assert len(leases) == 1, f"expected exactly the worker's lease, found {leases}"
    name, deadline_ms = leases[0]
    return name.decode(), deadline_ms


async def drain(
    mq: aioredmq.Client,
    queue: aioredmq.Queue[Any],
    expected: set[str],
    seen: dict[str, list[int]],
    *,
    timeout_s: float = 15.0,
) -> None:
    """Run an in-test consumer until every id in ``expected`` was handled; record id -> deliveries."""
    remaining = set(expected)

    async def handler(msg: aioredmq.Message[Any]) -> None:
        seen.setdefault(msg.id, []).append(msg.deliveries)
        remaining.discard(msg.id)

    with anyio.fail_after(timeout_s + 15):  # the close after the wait is bounded too
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(mq.run, queue, handler, concurrency=8, prefetch=50))
            await wait_for(lambda: not remaining, timeout_s, f"the drain to handle {len(remaining)} more message(s)")
            tg.cancel_scope.cancel()


def listed_at_least(
    proc: anyio.abc.Process, raw: aioredis.Redis, key: str, n: int, tmp_path: Path
) -> Callable[[], Awaitable[bool]]:
    """A check that the worker has recorded ``n`` ids in ``key``, failing if it exited."""

    async def check() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"worker exited early ({proc.returncode})\n{_output(tmp_path)}")
        return await raw.llen(key) >= n

    return check


async def assert_unstarted_back_then_drain(
    mq: aioredmq.Client,
    raw: aioredis.Redis,
    queue: aioredmq.Queue[Any],
    ids: list[str],
    started_ids: list[str],
    event: str,
) -> None:
    """After a graceful stop: what never started is back in order with deliveries == 1, and
    draining it hands out each of those exactly once and nothing handled before ``event``."""
    ready = await ready_envelopes(raw, queue)
    assert [e.id for e in ready] == ids[len(started_ids) :], "the unstarted messages are not back, in order"
    raised = {e.id: e.attempts + 1 for e in ready if e.attempts}
    assert not raised, f"returned unstarted message(s) no longer have deliveries == 1: {raised}"

    seen: dict[str, list[int]] = {}
    await drain(mq, queue, set(ids) - set(started_ids), seen)
    assert not (seen.keys() & set(started_ids)), f"a message handled before {event} was delivered again"
    assert seen.keys() | set(started_ids) == set(ids)
    assert all(d == [1] for d in seen.values()), f"duplicates or raised counts after {event}: {seen}"
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0), stats


# -- SIGKILL -----------------------------------------------------------------------------


async def test_sigkill_mid_batch_loses_nothing(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    queue = mq.queue("crash", lease_s=0.5)
    ids = await queue.publish_many([{"n": n} for n in range(N_CRASH)])
    options = ("--lease-s", "0.5", "--concurrency", "8", "--prefetch", "50")

    async with worker_process(tmp_path, redis_url, "tests.workers:crash_handler", "crash", *options) as proc:
        await poll(
            listed_at_least(proc, raw, STARTED, 40, tmp_path), 20, f"the worker to start handling\n{_output(tmp_path)}"
        )
        proc.send_signal(signal.SIGKILL)
        assert await wait_exit(proc, 10, tmp_path) == -signal.SIGKILL

    # Nothing runs now, so nothing can reap the dead worker yet: this is its state at death.
    started = await records(raw, STARTED)
    started_ids = {i for i, _ in started}
    name, _ = await lease_of_only_consumer(raw, queue)
    inflight_ids = {decode(r).id for r in await lrange_bytes(raw, queue.keys.inflight(name))}
    stats = await queue.stats()
    assert 0 < len(started_ids) < N_CRASH, f"killed before or after the batch: {len(started_ids)} handled"
    assert all(d == 1 for _, d in started), started
    assert stats.in_flight == len(inflight_ids) > 0, (stats, "the worker held nothing when it was killed")
    assert inflight_ids & started_ids, "no handler was running when the worker was killed"
    assert inflight_ids - started_ids, "the worker held no prefetched, unstarted message when it was killed"
    assert stats.ready == N_CRASH - len(started_ids | inflight_ids), stats
    acked = started_ids - inflight_ids  # handled and removed from in-flight before the kill

    # A live consumer reaps the dead one once its lease expires and handles the rest.
    seen: dict[str, list[int]] = {}
    await drain(mq, queue, set(ids) - acked, seen)

    assert set(ids) == acked | seen.keys(), "some published message was never handled"
    assert not (acked & seen.keys()), "a message acked before the kill was delivered again"
    duplicates = {i: d for i, d in seen.items() if len(d) != 1}
    assert not duplicates, f"handled more than once after the kill: {duplicates}"
    kept = {i: seen[i][0] for i in inflight_ids if seen[i][0] < 2}
    assert not kept, f"{len(kept)} of {len(inflight_ids)} recovered message(s) kept their delivery count: {kept}"
    raised = {i: d[0] for i, d in seen.items() if i not in inflight_ids and d[0] != 1}
    assert not raised, f"never-delivered message(s) came with a raised delivery count: {raised}"
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0), stats
    assert not await raw.exists(queue.keys.inflight(name)), "the dead worker's in-flight list is still there"


# -- graceful stop -----------------------------------------------------------------------


@pytest.mark.fault
async def test_sigterm_returns_prefetched_at_once(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    queue = mq.queue("graceful", lease_s=30)
    ids = await queue.publish_many([{"n": n} for n in range(N_GRACEFUL)])
    options = ("--lease-s", "30", "--concurrency", "2", "--prefetch", "20")

    async with worker_process(tmp_path, redis_url, "tests.workers:slow_handler", "graceful", *options) as proc:
        await poll(
            listed_at_least(proc, raw, DONE, 3, tmp_path), 20, f"the worker to handle a few\n{_output(tmp_path)}"
        )
        name, lease_deadline_ms = await lease_of_only_consumer(raw, queue)
        held = await raw.llen(queue.keys.inflight(name))
        proc.send_signal(signal.SIGTERM)
        returncode = await wait_exit(proc, 15, tmp_path)

    output = _output(tmp_path)
    assert returncode == 0, output
    assert "worker stopped gracefully" in output, output
    # Right away: no other consumer exists to reap it, and its lease has not even expired.
    sec, usec = await raw.time()
    assert sec * 1000 + usec // 1000 < lease_deadline_ms, "the worker's lease expired: recovery proves nothing"
    stats = await queue.stats()
    started = await records(raw, STARTED)
    done = await records(raw, DONE)
    started_ids = [i for i, _ in started]
    assert held > 2, f"the worker held only {held} message(s) at SIGTERM: nothing was prefetched"
    assert (stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0), stats
    assert stats.consumers == {}, f"the worker did not deregister: {stats}"
    assert len(started_ids) == len(set(started_ids)), f"handled twice before SIGTERM: {started}"
    assert sorted(done) == sorted(started), "a handler running at SIGTERM did not finish"
    assert set(started_ids) == set(ids[: len(started_ids)]), "handlers did not start in publish order"
    await assert_unstarted_back_then_drain(mq, raw, queue, ids, started_ids, "SIGTERM")
    report(
        f"graceful stop (SIGTERM) holding {held} prefetched messages",
        N_GRACEFUL,
        faults="SIGTERM: unstarted messages back at once, before the lease expired",
    )


async def test_cancelled_run_returns_prefetched_and_finishes_running(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    queue = mq.queue("inproc", lease_s=30)
    ids = await queue.publish_many([{"n": n} for n in range(N_GRACEFUL)])
    started: list[tuple[str, int]] = []
    done: list[str] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        started.append((msg.id, msg.deliveries))
        await anyio.sleep(0.2)
        done.append(msg.id)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(mq.run, queue, handler, concurrency=2, prefetch=20))
            await wait_for(lambda: len(done) >= 3 and len(started) > len(done), 10, "a few handled, one running")
            running_at_cancel = {i for i, _ in started} - set(done)
            tg.cancel_scope.cancel()

    started_ids = [i for i, _ in started]
    assert running_at_cancel, "no handler was running at cancel time"
    assert running_at_cancel <= set(done), "a handler running at cancel time was cut short"
    assert sorted(done) == sorted(started_ids), "a started handler did not finish"
    assert len(started_ids) == len(set(started_ids)), f"handled twice before the cancel: {started}"
    assert all(d == 1 for _, d in started), started
    assert set(started_ids) == set(ids[: len(started_ids)]), "handlers did not start in publish order"
    stats = await queue.stats()
    assert (stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0), stats
    assert stats.consumers == {}, f"the consumer did not deregister: {stats}"
    await assert_unstarted_back_then_drain(mq, raw, queue, ids, started_ids, "the cancel")
