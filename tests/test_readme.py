"""The README's Python blocks run as written, each in a fresh interpreter, against a
throwaway redis-server (a throwaway cluster for the cluster example).

The test fills in only the placeholders: ``redis://localhost:6379`` becomes the URL of
the server it started, ``redis://10.0.0.1:7000/0`` a node of its cluster. A block that
defines a web app and serves nothing gets a driver appended (a test client that sends it
a request). Each block is then checked for what it claims: its printed lines, and what
it left in Redis. A block that cannot run alone is marked in the README, right above it,
with ``<!-- fragment: why -->``: it is only compiled, and such blocks are counted.
"""

from __future__ import annotations

import ast
import re
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from aioredmq.testing import RedisClusterServers

from .conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.timeout(120)

README = ROOT / "README.md"
LOCAL_URL = re.compile(r"redis://localhost:6379(?:/0)?")
CLUSTER_URL = "redis://10.0.0.1:7000/0"
BLOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    section: str
    """The text of the nearest heading above the block."""
    index: int
    """Its place among the Python blocks of that section, from 0."""
    line: int
    source: str
    fragment: str | None
    """Why it cannot run alone, from the ``<!-- fragment: ... -->`` line above it."""

    @property
    def key(self) -> tuple[str, int]:
        return self.section, self.index

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{slug}-{self.index}"


def readme_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``, dedented (blocks may sit in list items)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = ""
    per_section: dict[str, int] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"#{1,6} (.+)", line)
        opening = re.match(r"( *)```python\s*$", line)
        if heading:
            section = heading.group(1).strip()
        elif opening:
            indent = opening.group(1)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == indent + "```")
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = re.fullmatch(r"<!-- fragment: (.+) -->", previous)
            index = per_section.get(section, 0)
            per_section[section] = index + 1
            source = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            blocks.append(Block(section, index, i + 1, source, marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.fragment is None]


def lines_of(out: str) -> list[str]:
    return out.splitlines()


# -- what each block must have done ----------------------------------------------------

Check = Callable[[list[str], redis.Redis], None]


def check_queue_loop(out: list[str], r: redis.Redis) -> None:
    # Every message, in publish order, and nothing left: each was acked.
    assert out == ["{'user': 42}"] + [f"{{'user': {n}}}" for n in range(1000)]
    assert r.llen("aioredmq:{jobs}:ready") == 0
    assert all(r.llen(key) == 0 for key in r.keys("aioredmq:{jobs}:inflight:*"))


def check_runner(out: list[str], r: redis.Redis) -> None:
    assert sorted(out) == [f"handled {{'user': {n}}}" for n in range(3)]
    assert r.llen("aioredmq:{jobs}:ready") == 0


def check_streams(out: list[str], r: redis.Redis) -> None:
    # Both groups got the entry published before either consumer ran, and acked it.
    assert out == ["billing {'user': 42}", "search {'user': 42}"]
    groups = {g["name"]: g for g in r.xinfo_groups("aioredmq:{events}:stream")}
    assert set(groups) == {"billing", "search"}
    assert all(g["pending"] == 0 and g["lag"] == 0 for g in groups.values())


def check_delayed(out: list[str], r: redis.Redis) -> None:
    assert out == ["True", "1"]
    assert r.zcard("aioredmq:{jobs}:delayed") == 1


def check_channel(out: list[str], r: redis.Redis) -> None:
    assert out == ["1", "news {'headline': '...'}"]


def check_idempotency(out: list[str], r: redis.Redis) -> None:
    # Two messages, through process() and through the runner: each effect applied once.
    assert out == ["took one from stock"] * 2
    assert r.get("stock:{orders}:7") == "-2"
    assert r.llen("log:{orders}") == 2
    assert r.zcard("aioredmq:{orders}:done") == 2


def check_partitioned(out: list[str], r: redis.Redis) -> None:
    assert sorted(out) == ["customer-42 {'op': 'create'}", "customer-42 {'op': 'pay'}", "customer-7 {'op': 'create'}"]
    assert out.index("customer-42 {'op': 'create'}") < out.index("customer-42 {'op': 'pay'}")


def check_typed(out: list[str], r: redis.Redis) -> None:
    assert out == ["['tea']"]


def check_fastapi(out: list[str], r: redis.Redis) -> None:
    assert len(out) == 3, out
    assert re.fullmatch(r"status 200 \{'id': '[0-9a-f]{32}'\}", out[0]), out
    assert "shipping {'item': 7}" in out
    assert "left 0 0" in out


def check_aiohttp(out: list[str], r: redis.Redis) -> None:
    assert len(out) == 1, out
    assert re.fullmatch(r"status 200 \{'id': '[0-9a-f]{32}'\}", out[0]), out
    assert r.llen("aioredmq:{orders}:ready") == 1  # published; this app runs no handler


def check_ready(out: list[str], r: redis.Redis) -> None:
    assert out[0].startswith("before 503"), out
    assert out[1:] == ["running 200 {'ready': True}"]


def check_metrics(out: list[str], r: redis.Redis) -> None:
    assert out == ["1.0", "1.0"]


def check_cluster(out: list[str], r: redis.Redis) -> None:
    assert out == ["1"]


def check_inspection(out: list[str], r: redis.Redis) -> None:
    assert out[0] == "1"
    assert re.fullmatch(r"gave up Envelope\(id='[0-9a-f]{32}', .*body=b'\{\"user\":42\}'\)", out[1]), out
    assert out[2:] == ["1", "1", "1"]
    assert r.llen("aioredmq:{jobs}:ready") == 1  # requeued
    assert r.llen("aioredmq:{jobs}:dead") == 0


FASTAPI_DRIVER = """
import anyio
import httpx


async def drive() -> None:
    # The app's lifespan, as a server runs it, and requests straight to the ASGI app.
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    async with app.router.lifespan_context(app), client:
        response = await client.post("/orders", json={"item": 7})
        print("status", response.status_code, response.json())
        queue = service.client.queue("orders")
        with anyio.move_on_after(10):
            while (stats := await queue.stats()).ready or stats.in_flight:
                await anyio.sleep(0.05)
        print("left", stats.ready, stats.in_flight)


anyio.run(drive)
"""

AIOHTTP_DRIVER = """
import asyncio
from aiohttp.test_utils import TestClient, TestServer


async def drive() -> None:
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/orders", json={"item": 7})
        print("status", response.status, await response.json())


asyncio.run(drive())
"""

READY_DRIVER = """
import anyio
import httpx


async def drive() -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    async with client:
        print("before", (await client.get("/ready")).status_code)  # no lifespan: the service is not running
        async with app.router.lifespan_context(app):
            with anyio.move_on_after(10):
                while (response := await client.get("/ready")).status_code != 200:
                    await anyio.sleep(0.05)
            print("running", response.status_code, response.json())


anyio.run(drive)
"""

WEB = "In a web service: FastAPI, Starlette, aiohttp"

EXPECTED: dict[tuple[str, int], tuple[Check, str]] = {
    ("Example", 0): (check_queue_loop, ""),
    ("Example", 1): (check_runner, ""),
    ("Streams", 0): (check_streams, ""),
    ("Delayed delivery", 0): (check_delayed, ""),
    ("Pub/sub channels", 0): (check_channel, ""),
    ("Idempotency: each effect once", 0): (check_idempotency, ""),
    ("Per-key ordering: the partitioned queue", 0): (check_partitioned, ""),
    ("Typed bodies", 0): (check_typed, ""),
    (WEB, 0): (check_fastapi, FASTAPI_DRIVER),
    (WEB, 1): (check_aiohttp, AIOHTTP_DRIVER),
    (WEB, 2): (check_ready, READY_DRIVER),
    ("Metrics, tracing and logs", 0): (check_metrics, ""),
    ("Redis Cluster, Sentinel and replicated durability", 0): (check_cluster, ""),
    ("Inspection and dead letters", 0): (check_inspection, ""),
}

# The blocks that only compile, and why: keep this list short.
FRAGMENTS = {("Idempotency: each effect once", 1)}


def test_every_block_is_checked_or_marked_a_fragment() -> None:
    assert len(BLOCKS) >= len(EXPECTED) + len(FRAGMENTS)
    assert {b.key for b in RUNNABLE} == set(EXPECTED), "a README block was added or moved: check what it does"
    assert {b.key for b in BLOCKS if b.fragment is not None} == FRAGMENTS
    assert all(b.fragment and len(b.fragment) > 10 for b in BLOCKS if b.fragment is not None)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.fragment is not None], ids=lambda b: b.id)
def test_fragment_compiles(block: Block) -> None:
    compile(block.source, f"README.md:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


def params() -> list[object]:
    out: list[object] = []
    for b in RUNNABLE:
        marks = [pytest.mark.cluster, pytest.mark.slow] if CLUSTER_URL in b.source else []
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


@pytest.mark.parametrize("block", params())
def test_block_runs_as_written(block: Block, request: pytest.FixtureRequest) -> None:
    check, driver = EXPECTED[block.key]
    if CLUSTER_URL in block.source:
        cluster: RedisClusterServers = request.getfixturevalue("cluster")
        url = cluster.url
        source = block.source.replace(CLUSTER_URL, url)
    else:
        url = request.getfixturevalue("redis_url")
        source = LOCAL_URL.sub(url, block.source)
    assert set(re.findall(r"rediss?://[^\"' ]+", source)) <= {url}, "a Redis URL the test does not fill in"
    done = subprocess.run(
        [PYTHON, "-c", source + driver],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    where = f"README.md:{block.line} ({block.section})"
    assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stderr == "", f"{where} wrote to stderr:\n{done.stderr}"
    with redis.Redis.from_url(url, decode_responses=True) as r:
        check(lines_of(done.stdout), r)


def test_blocks_are_formatted() -> None:
    """``ruff format`` formats the README's Python blocks too: they stay as it writes them."""
    done = subprocess.run(
        [PYTHON, "-m", "ruff", "format", "--check", "--diff", str(README)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
