"""Fixtures: one real redis-server per test session on a free loopback port, flushed per test."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    with redis.Redis.from_url(redis_server.url) as r:
        r.flushall()
    return redis_server.url


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, to look at (and tamper with) the keys directly."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def mq(redis_url: str) -> AsyncIterator[aioredmq.Client]:
    async with aioredmq.connect(redis_url) as client:
        yield client


def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that imports aioredmq and the tests package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


PYTHON = sys.executable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault scenarios' figures, as the README's "Guarantees, tested" table."""
    from .ledger import REPORTS

    if not REPORTS:
        return
    write = terminalreporter.write_line
    write("")
    write("Guarantees, tested (fault scenarios; lost must be 0, duplicates only where a fault explains them):")
    write("| scenario | confirmed messages | lost | duplicated | dead-lettered | recovery | faults injected |")
    write("|---|---:|---:|---:|---:|---:|---|")
    for r in REPORTS:
        recovery = f"{r.recovery_s:.2f} s" if r.recovery_s is not None else ""
        write(f"| {r.scenario} | {r.messages} | {r.lost} | {r.duplicated} | {r.dead} | {recovery} | {r.faults} |")
