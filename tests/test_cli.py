"""The command line, run as a subprocess against a real redis-server: stats, peek, dead, worker, bench."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq import ops
from aioredmq.partitioned import KEY_HEADER
from aioredmq.testing import free_port

from .conftest import PYTHON, ROOT, subprocess_env
from .helpers import settled_stats, wait_for

pytestmark = pytest.mark.timeout(90)


async def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = await anyio.run_process([PYTHON, "-m", "aioredmq", *args], env=subprocess_env(), cwd=ROOT, check=False)
    out = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
    if check and out.returncode:
        raise AssertionError(f"aioredmq {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


async def cli_json(*args: str) -> Any:
    return json.loads((await cli(*args, "--json")).stdout)


async def test_stats_shows_queues_streams_consumers_and_groups(mq: aioredmq.Client, redis_url: str) -> None:
    orders = mq.queue("orders")
    await orders.publish_many([{"n": i} for i in range(7)])
    await orders.publish({"n": 99}, delay=60)
    events = mq.stream("events")
    await events.create_group("billing", "begin")
    await events.publish_many([{"e": i} for i in range(4)])
    async with orders.consume(prefetch=2, name="worker-1", block_s=0.2) as consumer:
        await anyio.sleep(0.2)  # it fetched its two and renewed its lease
        data = await cli_json("stats", "--url", redis_url)
        table = (await cli("stats", "--url", redis_url)).stdout
        assert consumer.held == 2
    q = data["queues"]["orders"]
    assert (q["ready"], q["in_flight"], q["delayed"], q["dead"]) == (5, 2, 1, 0)
    assert 0 <= q["consumers"]["worker-1"]["last_heartbeat_s_ago"] < 5
    g = data["streams"]["events"]["groups"]["billing"]
    assert (data["streams"]["events"]["length"], g["pending"], g["lag"]) == (4, 0, 4)
    assert "orders" in table
    assert "worker-1" in table
    assert "billing" in table
    # Named: only that one.
    only = await cli_json("stats", "events", "--url", redis_url)
    assert list(only["streams"]) == ["events"]
    assert only["queues"] == {}


async def test_peek_shows_the_next_messages_without_taking_them(mq: aioredmq.Client, redis_url: str) -> None:
    q = mq.queue("peeked")
    ids = await q.publish_many([{"n": i} for i in range(5)])
    rows = await cli_json("peek", "peeked", "--count", "3", "--url", redis_url)
    assert [r["id"] for r in rows] == ids[:3]
    assert json.loads(rows[0]["body"]) == {"n": 0}
    assert (await q.stats()).ready == 5, "peek took nothing"
    s = mq.stream("peeked-s")
    await s.create_group("g", "begin")
    sids = await s.publish_many([{"n": i} for i in range(3)])
    async with s.consume("g", prefetch=1, block_s=0.2) as consumer:
        msg = await consumer.__anext__()  # it holds its prefetch of one: it reads no more
        rows = await cli_json("peek", "peeked-s", "--group", "g", "--url", redis_url)
        await msg.ack()
    assert [r["id"] for r in rows] == sids[1:], "what the group has not been given yet"


async def test_dead_letters_are_listed_filtered_requeued_and_purged(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str
) -> None:
    q = mq.queue("dl", retry=aioredmq.RetryPolicy(max_deliveries=1))
    ids = await q.publish_many([{"n": i} for i in range(4)])
    await raw.lpush(q.keys.ready, b"not an envelope")
    async with q.consume(block_s=0.2) as consumer:
        for _ in range(4):
            msg = await consumer.__anext__()
            reason = "timeout talking to billing" if msg.body["n"] % 2 else "bad address"
            await msg.dead_letter(reason)
        await anyio.sleep(0.3)  # the undecodable one is dead-lettered on fetch
    assert (await q.stats()).dead == 5
    listed = await cli_json("dead", "list", "dl", "--url", redis_url)
    assert len(listed) == 5
    timeouts = await cli_json("dead", "list", "dl", "--reason", "TIMEOUT", "--url", redis_url)
    assert sorted(r["id"] for r in timeouts) == sorted(ids[1::2])
    # Changing commands need a filter or --all.
    refused = await cli("dead", "purge", "dl", "--url", redis_url, check=False)
    assert refused.returncode != 0
    assert "--all" in refused.stderr
    assert await cli_json("dead", "requeue", "dl", "--id", ids[0], "--url", redis_url) == {"requeued": 1}
    assert await cli_json("dead", "purge", "dl", "--reason", "timeout", "--url", redis_url) == {"purged": 2}
    stats = await q.stats()
    assert (stats.ready, stats.dead) == (1, 2), "one requeued, two purged, the rest stay"
    assert await cli_json("dead", "purge", "dl", "--all", "--url", redis_url) == {"purged": 2}


async def test_bench_compares_with_raw_redis_py_in_the_same_run(raw: aioredis.Redis, redis_url: str) -> None:
    data = await cli_json("bench", "--messages", "2000", "--rounds", "1", "--url", redis_url)
    assert set(data["median_msg_per_s"]) == {"raw publish", "raw consume", "publish", "consume"}
    assert all(v > 0 for v in data["median_msg_per_s"].values())
    assert data["vs_raw"]["end_to_end"] > 0
    assert await raw.dbsize() == 0, f"the bench left keys: {await raw.keys('*')}"


async def test_a_group_where_none_applies_or_none_where_one_must_is_a_clear_error(
    mq: aioredmq.Client, redis_url: str
) -> None:
    await mq.queue("plain").publish(1)
    await mq.stream("grouped").publish(1)
    for args, why in (
        (("dead", "list", "plain", "--group", "g"), "is a queue: it has no groups"),
        (("dead", "list", "grouped"), "is a stream: say which group"),
        (("peek", "grouped", "--group", "nope"), "has no group 'nope'"),
    ):
        done = await cli(*args, "--url", redis_url, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert why in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# -- partitioned queues ------------------------------------------------------------------


async def test_a_partitioned_queue_is_one_row_of_its_partitions_totals(mq: aioredmq.Client, redis_url: str) -> None:
    orders = mq.partitioned("orders", partitions=4, retry=aioredmq.RetryPolicy(max_deliveries=1))
    ids = await orders.publish_many((f"customer-{i}", {"n": i}) for i in range(24))
    await mq.queue("plain").publish(1)
    by_partition = [len(await p.peek(100)) for p in orders.partitions]
    assert all(by_partition), "every partition has messages"
    async with orders.consume(prefetch=1, name="member-1", block_s=0.2) as consumer:
        msg = await consumer.__anext__()
        await msg.dead_letter("bad address")
    everything = await cli_json("stats", "--url", redis_url)
    table = (await cli("stats", "--url", redis_url)).stdout
    only = await cli_json("stats", "orders", "--url", redis_url)
    split = await cli_json("stats", "orders", "--partitions", "--url", redis_url)
    split_table = (await cli("stats", "orders", "--partitions", "--url", redis_url)).stdout
    row = everything["partitioned"]["orders"]
    assert (row["partitions"], row["ready"], row["in_flight"], row["dead"]) == (4, 23, 0, 1)
    assert list(everything["queues"]) == ["plain"], "a partition is no queue of its own"
    assert "partitioned queue" in table
    assert "orders#" not in table, "one row, not one per partition"
    assert only["partitioned"]["orders"]["ready"] == 23
    assert (only["queues"], only["streams"]) == ({}, {})
    parts = split["partitioned"]["orders"]["by_partition"]
    assert list(parts) == [f"orders#{i}" for i in range(4)]
    assert sum(p["ready"] for p in parts.values()) == 23
    assert all(f"orders#{i}" in split_table for i in range(4))
    # peek: across partitions in publish order; or one partition.
    rows = await cli_json("peek", "orders", "--count", "30", "--url", redis_url)
    assert sorted(r["id"] for r in rows) == sorted(set(ids) - {msg.id})
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    one = await cli_json("peek", "orders#1", "--count", "30", "--url", redis_url)
    assert [r["id"] for r in one] == [ops.message_row(raw)["id"] for raw in await orders.partitions[1].peek(30)]
    # dead letters of every partition, named by theirs.
    (dead,) = await cli_json("dead", "list", "orders", "--url", redis_url)
    assert (dead["id"], dead["partition"], dead["reason"]) == (msg.id, orders.partition_of(msg.headers[KEY_HEADER]),
                                                               "bad address")  # fmt: skip
    assert await cli_json("dead", "requeue", "orders", "--id", msg.id, "--url", redis_url) == {"requeued": 1}
    assert sum(s.ready for s in (await orders.stats()).partitions) == 24


# -- worker ------------------------------------------------------------------------------

SCRIPT = Path(PYTHON).with_name("aioredmq")  # the installed console script

HANDLERS = """
from pathlib import Path

LIMIT = 5


async def handle(msg):
    Path("handled.txt").write_text(repr(msg.body))


def plain(msg):
    pass
"""


def app(tmp_path: Path) -> Path:
    """A folder holding the package ``myapp``, as a project's checkout would."""
    pkg = tmp_path / "myapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "handlers.py").write_text(HANDLERS)
    (pkg / "broken.py").write_text("async def handle(msg:\n")
    (pkg / "needs.py").write_text("import nosuchdependency\n")
    return tmp_path


class Running:
    """A child process whose output is read as it comes."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.out = ""

    async def said(self, text: str, timeout_s: float) -> bool:
        """Whether ``text`` was printed within ``timeout_s``."""
        assert self.process.stdout is not None
        with anyio.move_on_after(timeout_s):
            while text not in self.out:
                try:
                    self.out += (await self.process.stdout.receive()).decode()
                except anyio.EndOfStream:
                    break
        return text in self.out


@contextlib.asynccontextmanager
async def running(*args: str, cwd: Path, path: Path | None = None) -> AsyncIterator[Running]:
    """The console script running ``args`` in ``cwd`` (with ``path`` on PYTHONPATH)."""
    if not SCRIPT.exists():
        pytest.skip("the aioredmq console script is not installed next to this Python")
    env = subprocess_env()
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join((str(path), env["PYTHONPATH"]))
    with (cwd / "stderr.txt").open("wb") as err:
        process = await anyio.open_process([str(SCRIPT), *args], cwd=cwd, env=env, stderr=err)
        try:
            yield Running(process)
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_the_worker_script_imports_the_handler_from_the_working_directory(
    mq: aioredmq.Client, redis_url: str, tmp_path: Path
) -> None:
    here = app(tmp_path)
    async with running("worker", "myapp.handlers:handle", "--queue", "jobs", "--url", redis_url, cwd=here) as w:
        assert await w.said("worker ready: queue=jobs", 10), (w.out, (here / "stderr.txt").read_text())
        await mq.queue("jobs").publish({"n": 1})
        await wait_for(lambda: (here / "handled.txt").exists(), 10, "the handler ran")
        w.process.send_signal(signal.SIGTERM)
        assert await w.said("worker stopped gracefully", 15), w.out
        assert await w.process.wait() == 0
    assert (here / "handled.txt").read_text() == "{'n': 1}"


async def test_a_handler_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path: Path) -> None:
    here = app(tmp_path)
    cases = {
        "nosuch.handlers:handle": "no module named 'nosuch'",
        "myapp.nosuch:handle": "no module named 'myapp.nosuch'",
        "myapp.handlers:nosuch": "has no 'nosuch' (its async functions: handle)",
        "myapp.broken:handle": "SyntaxError",
        "myapp.needs:handle": "No module named 'nosuchdependency' (at ",
        "myapp.handlers:LIMIT": "is not an async function: it is of type int",
        "myapp.handlers:plain": "is not an async function",
        "myapp.handlers": "must look like 'package.module:function'",
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}

    async def one(spec: str) -> None:
        if not SCRIPT.exists():
            pytest.skip("the aioredmq console script is not installed next to this Python")
        out = await anyio.run_process([str(SCRIPT), "worker", spec, "--queue", "q"], cwd=here, env=subprocess_env(),
                                      check=False)  # fmt: skip
        done[spec] = subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())

    async with anyio.create_task_group() as tg:
        for spec in cases:
            tg.start_soon(one, spec)
    for spec, why in cases.items():
        out = done[spec]
        assert out.returncode == 2, (spec, out.stderr)
        assert out.stderr.startswith("aioredmq worker: "), (spec, out.stderr)
        assert out.stderr.count("\n") == 1, (spec, out.stderr)
        assert why in out.stderr, (spec, out.stderr)
        assert "worker ready" not in out.stdout


async def test_worker_ready_is_said_once_its_consumer_is_open(redis_url: str, tmp_path: Path) -> None:
    here = app(tmp_path)  # on PYTHONPATH too: this is about readiness, not about finding the handler
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    worker = ("worker", "myapp.handlers:handle", "--queue", "jobs", "--url")
    async with running(*worker, nowhere, cwd=here, path=here) as w:
        assert not await w.said("worker ready", 2), "nothing listens: the worker is not ready"
        assert w.process.returncode is None, "it waits for Redis"
    async with running(*worker, redis_url, cwd=here, path=here) as w:
        assert await w.said("worker ready: queue=jobs concurrency=16", 10), w.out


# -- help and bench ----------------------------------------------------------------------

COMMANDS = (("demo",), ("worker",), ("stats",), ("peek",), ("dead", "list"), ("dead", "requeue"), ("dead", "purge"),
            ("bench",))  # fmt: skip


def help_entries(text: str) -> dict[str, str]:
    """Each argument of a ``--help`` text, by how it is spelled, with its help."""
    entries: dict[str, str] = {}
    section = ""
    current = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section, current = line, ""
        elif section in ("options:", "positional arguments:") and re.match(r"^  \S", line):
            spelled, _, help = line.strip().partition("  ")
            current = spelled
            entries[current] = help.strip()
        elif current and line.startswith("     "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


async def test_help_gives_every_option_its_meaning_and_default() -> None:
    helps = {c: (await cli(*c, "--help")).stdout for c in COMMANDS}
    for c, text in helps.items():
        entries = help_entries(text)
        assert entries, (c, text)
        for spelled, help in entries.items():
            if spelled == "-h, --help":
                continue
            assert help, f"aioredmq {' '.join(c)}: {spelled} has no help"
            if spelled.startswith("-") and " " in spelled:  # an option taking a value
                assert "default" in help or "required" in help, f"aioredmq {' '.join(c)}: {spelled}: {help}"
    assert "--codec {json,raw,msgpack}" in helps[("worker",)]
    assert "(default: 16)" in helps[("worker",)]
    bench = " ".join(helps[("bench",)].split())
    assert "starts its own throwaway redis-server unless --url is given" in bench


async def test_bench_keeps_to_its_prefix_and_leaves_no_keys(raw: aioredis.Redis, redis_url: str) -> None:
    # A user that may touch only keys and channels under the prefix: any other is refused.
    acl = ["~bench-test:*", "&bench-test:*", "&bench-test:{*}:due", "+@all"]
    await raw.execute_command("ACL", "SETUSER", "bencher", "reset", "on", ">secret", *acl)
    try:
        url = redis_url.replace("redis://", "redis://bencher:secret@")
        data = await cli_json("bench", "--messages", "300", "--rounds", "1", "--prefix", "bench-test", "--url", url)
    finally:
        await raw.execute_command("ACL", "DELUSER", "bencher")
    assert data["median_msg_per_s"]["consume"] > 0
    assert await raw.dbsize() == 0, await raw.keys("*")


# -- typos and exit codes ----------------------------------------------------------------


async def dead_letter_one(mq: aioredmq.Client, name: str) -> str:
    q = mq.queue(name)
    await q.publish({"n": 1})
    async with q.consume(block_s=0.2) as consumer:
        msg = await consumer.__anext__()
        await msg.dead_letter("bad address")
    return msg.id


async def test_a_typo_is_an_error_that_names_what_there_is(mq: aioredmq.Client, redis_url: str) -> None:
    mid = await dead_letter_one(mq, "orders")
    events = mq.stream("events")
    await events.create_group("billing")
    await events.publish(1)
    there = "there are: events (stream), orders"
    for args, code, why in (
        (("peek", "nosuch"), 2, ["no queue, stream or partitioned queue named 'nosuch'", there]),
        (("stats", "nosuch"), 2, [there]),
        (("dead", "list", "nosuch"), 2, [there]),
        (("dead", "purge", "events", "--group", "nosuch", "--all"), 2, ["has no group 'nosuch' (its groups: billing)"]),
        (("dead", "requeue", "orders", "--id", "0badc0de"), 1,
         ["no dead letter of orders matches --id 0badc0de; nothing was changed", mid, "'bad address'"]),
        (("dead", "list", "orders", "--reason", "timeout"), 1, ["no dead letter of orders matches --reason 'timeout'"]),
        (("peek", "orders#1"), 2, ["no partitioned queue named 'orders'"]),
    ):  # fmt: skip
        done = await cli(*args, "--url", redis_url, check=False)
        command = " ".join(args[:2]) if args[0] == "dead" else args[0]
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert done.stderr.startswith(f"aioredmq {command}: "), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert all(w in done.stderr for w in why), (why, done.stderr)
    assert (await mq.queue("orders").stats()).dead == 1, "nothing was requeued"
    assert await cli_json("dead", "purge", "events", "--group", "billing", "--all", "--url", redis_url) == {"purged": 0}


async def test_usage_errors_exit_2_and_name_the_command(mq: aioredmq.Client, redis_url: str) -> None:
    await dead_letter_one(mq, "orders")
    for args in (("dead", "requeue", "orders"), ("dead", "purge", "orders")):
        done = await cli(*args, "--url", redis_url, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr == f"aioredmq {' '.join(args[:2])}: say which dead letters (--id, --reason) or --all\n"
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("stats",), ("bench", "--messages", "10", "--rounds", "1")):
        done = await cli(*args, "--url", nowhere, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(f"aioredmq {args[0]}: could not connect"), done.stderr
        assert "Traceback" not in done.stderr
    assert (await mq.queue("orders").stats()).dead == 1


# -- dead-letter rows and heartbeats -----------------------------------------------------


async def test_dead_letters_show_their_deliveries_and_a_readable_reason(mq: aioredmq.Client, redis_url: str) -> None:
    q = mq.queue("failing", retry=aioredmq.RetryPolicy(max_deliveries=2, backoff_initial_s=0.01))
    await q.publish_many([{"n": 0}, {"n": 1}])

    async def handler(msg: aioredmq.Message[Any]) -> None:
        if msg.body["n"] == 0:
            raise ValueError()
        await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, handler_timeout_s=0.2))
        await settled_stats(q, dead=2, ready=0, in_flight=0, delayed=0)
        tg.cancel_scope.cancel()
    rows = await cli_json("dead", "list", "failing", "--url", redis_url)
    table = (await cli("dead", "list", "failing", "--url", redis_url)).stdout
    assert [r["deliveries"] for r in rows] == [2, 2]
    assert sorted(r["reason"] for r in rows) == [
        "TimeoutError: handler timed out after 0.2 s; delivered 2 times (max_deliveries=2)",
        "ValueError; delivered 2 times (max_deliveries=2)",
    ]
    header, _, *lines = table.splitlines()
    assert header.split()[:3] == ["id", "deliveries", "published"]
    assert all(line.split()[1] == "2" for line in lines), table
    assert "TimeoutError: handler timed out after 0.2 s; delivered 2 times (max_deliveries=2)" in table


async def test_stats_ages_each_heartbeat_by_the_consumers_own_lease(mq: aioredmq.Client, redis_url: str) -> None:
    q = mq.queue("short-lease", lease_s=6)
    await q.publish(1)
    async with q.consume(name="worker-6s", block_s=0.2):
        await anyio.sleep(0.3)
        data = await cli_json("stats", "short-lease", "--url", redis_url)  # its default --lease-s is 30
    seen = data["queues"]["short-lease"]["consumers"]["worker-6s"]
    assert seen["lease_s"] == 6
    assert 0 <= seen["last_heartbeat_s_ago"] < 3, seen
