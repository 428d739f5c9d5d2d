"""Handlers for worker subprocesses started by the crash tests (``python -m aioredmq worker tests.workers:...``).

Each handler records what it sees in plain Redis lists, through its own connection to
the URL in ``AIOREDMQ_TEST_URL``, as ``"<message id> <deliveries>"``:

* ``crash_handler`` pushes to ``STARTED`` when it starts, then sleeps a little, so a
  worker killed at any moment is in the middle of a batch;
* ``slow_handler`` pushes to ``STARTED`` when it starts and to ``DONE`` when it ends;
* ``timed_handler`` pushes to ``TIMED`` with the time it ran (Unix ms);
* ``idempotent_handler`` applies an effect with its processed-id marker, then stalls;
* ``ordered_handler`` records each handling of a partitioned queue's message, and its effect once;
* ``ledger_handler`` works for a random 0-20 ms, then records its completion in ``DONE``.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import anyio
import redis.asyncio as aioredis

import aioredmq
from aioredmq.partitioned import KEY_HEADER

STARTED = "test:started"
DONE = "test:done"
URL_ENV = "AIOREDMQ_TEST_URL"

_redis: aioredis.Redis | None = None


def _client() -> aioredis.Redis:
    global _redis
    if _redis is None:
        _redis = aioredis.Redis.from_url(os.environ[URL_ENV])
    return _redis


async def _record(key: str, msg: aioredmq.Message[Any]) -> None:
    await _client().rpush(key, f"{msg.id} {msg.deliveries}")


async def crash_handler(msg: aioredmq.Message[Any]) -> None:
    await _record(STARTED, msg)
    await anyio.sleep(0.05)


async def slow_handler(msg: aioredmq.Message[Any]) -> None:
    await _record(STARTED, msg)
    await anyio.sleep(0.2)
    await _record(DONE, msg)


TIMED = "test:timed"


async def timed_handler(msg: aioredmq.Message[Any]) -> None:
    """Pushes ``"<id> <deliveries> <unix ms>"`` to ``TIMED``: when it was handled."""
    await _client().rpush(TIMED, f"{msg.id} {msg.deliveries} {time.time_ns() // 1_000_000}")


EFFECTS = "test:effects"
ONCE = aioredmq.Idempotency(ttl_s=3600)


async def idempotent_handler(msg: aioredmq.Message[Any]) -> None:
    """Applies its effect (an INCR) with the processed-id marker, records
    ``"<id> <deliveries> <applied>"`` in ``EFFECTS``, and on a first delivery then waits
    long enough to be killed before its ack."""
    applied = await ONCE.apply(msg, ("INCR", f"test:effect:{msg.id}"))
    await _client().rpush(EFFECTS, f"{msg.id} {msg.deliveries} {int(applied)}")
    if msg.deliveries == 1:
        await anyio.sleep(30)


ORDER = "test:order"


async def ordered_handler(msg: aioredmq.Message[Any]) -> None:
    """For a partitioned queue whose bodies are sequence numbers: records every handling as
    ``"<key> <seq> <deliveries>"`` in ``ORDER``, and applies the effect (appending the seq
    to ``test:effects:<key>``) once per message id."""
    key = msg.headers[KEY_HEADER]
    await _client().rpush(ORDER, f"{key} {msg.body} {msg.deliveries}")
    await ONCE.apply(msg, ("RPUSH", f"test:effects:{key}", msg.body))


async def ledger_handler(msg: aioredmq.Message[Any]) -> None:
    """A completion for the fault ledger: ``"<body n> <deliveries>"`` in ``DONE``, pushed
    when the work is done and before the ack, so a kill in between shows as a duplicate."""
    await anyio.sleep(random.random() * 0.02)
    await _client().rpush(DONE, f"{msg.body['n']} {msg.deliveries}")
