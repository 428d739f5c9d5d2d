"""Real apps on loopback ports: FastAPI under uvicorn, and aiohttp under its runner.

A POST publishes, a handler in the same app processes the message and records the
result in Redis, a GET shows it. Stopping the server while messages are in flight loses
none: running handlers finish, prefetched messages go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from aiohttp import web
from fastapi import Depends, FastAPI, HTTPException

import aioredmq
from aioredmq.integrations import aiohttp as mq_aiohttp
from aioredmq.integrations.fastapi import lifespan, queue_dependency
from aioredmq.testing import free_port

from .helpers import as_bytes, lrange_bytes, wait_for

pytestmark = pytest.mark.timeout(60)

RESULTS = "test:web:results"
HANDLED = "test:web:handled"


def make_service(redis_url: str, delay_s: float) -> aioredmq.Service:
    """The same service for both frameworks: orders are 'processed' into a result hash."""
    service = aioredmq.Service(redis_url)

    @service.handler("orders", concurrency=2, grace_s=10)
    async def process(msg: aioredmq.Message[dict[str, Any]]) -> None:
        await anyio.sleep(delay_s)
        redis = service.client.redis
        await redis.hset(RESULTS, msg.body["order"], f"shipped {msg.body['item']}")
        await redis.rpush(HANDLED, msg.id)

    return service


Orders = Annotated[aioredmq.Queue[Any], Depends(queue_dependency("orders"))]


def fastapi_app(service: aioredmq.Service) -> FastAPI:
    app = FastAPI(lifespan=lifespan(service))

    @app.post("/orders")
    async def create(body: dict[str, str], orders: Orders) -> dict[str, str]:
        return {"id": await orders.publish(body)}

    @app.get("/orders/{order}")
    async def status(order: str) -> dict[str, str]:
        result = await service.client.redis.hget(RESULTS, order)
        if result is None:
            raise HTTPException(404, "not processed yet")
        return {"order": order, "status": as_bytes(result).decode()}

    return app


def aiohttp_app(service: aioredmq.Service) -> web.Application:
    app = web.Application()
    mq_aiohttp.setup(app, service)

    async def create(request: web.Request) -> web.Response:
        message_id = await mq_aiohttp.queue(request, "orders").publish(await request.json())
        return web.json_response({"id": message_id})

    async def status(request: web.Request) -> web.Response:
        order = request.match_info["order"]
        result = await mq_aiohttp.client(request).redis.hget(RESULTS, order)
        if result is None:
            raise web.HTTPNotFound(text="not processed yet")
        return web.json_response({"order": order, "status": as_bytes(result).decode()})

    app.router.add_post("/orders", create)
    app.router.add_get("/orders/{order}", status)
    return app


Serve = Callable[[aioredmq.Service], contextlib.AbstractAsyncContextManager[tuple[str, Callable[[], Awaitable[None]]]]]


@contextlib.asynccontextmanager
async def serve_fastapi(service: aioredmq.Service) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fastapi_app(service), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve())

    async def stop() -> None:
        server.should_exit = True
        await task

    try:
        await wait_for(lambda: server.started, 10, "uvicorn to start")
        yield f"http://127.0.0.1:{port}", stop
    finally:
        if not task.done():
            await stop()


@contextlib.asynccontextmanager
async def serve_aiohttp(service: aioredmq.Service) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    port = free_port()
    runner = web.AppRunner(aiohttp_app(service))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await runner.cleanup()

    try:
        yield f"http://127.0.0.1:{port}", stop
    finally:
        await stop()


FRAMEWORKS: dict[str, Serve] = {"fastapi": serve_fastapi, "aiohttp": serve_aiohttp}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_post_is_processed_in_the_same_app_and_a_get_shows_it(framework: str, redis_url: str) -> None:
    service = make_service(redis_url, delay_s=0)
    async with FRAMEWORKS[framework](service) as (base, _), httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/orders/42")).status_code == 404
        posted = await http.post("/orders", json={"order": "42", "item": "tea"})
        assert posted.status_code == 200, posted.text
        message_id = posted.json()["id"]

        async def shipped() -> bool:
            response = await http.get("/orders/42")
            return response.status_code == 200 and response.json()["status"] == "shipped tea"

        with anyio.fail_after(10):
            while not await shipped():  # noqa: ASYNC110 - polling the app over HTTP
                await anyio.sleep(0.02)
    async with aioredis.Redis.from_url(redis_url) as raw:
        assert await raw.lrange(HANDLED, 0, -1) == [message_id.encode()]
    assert not service.running, "the app's shutdown stopped the service"


@pytest.mark.fault
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_stopping_the_server_with_messages_in_flight_loses_none(framework: str, redis_url: str) -> None:
    service = make_service(redis_url, delay_s=0.3)
    ids: list[str] = []
    async with FRAMEWORKS[framework](service) as (base, stop), httpx.AsyncClient(base_url=base) as http:
        for n in range(20):
            response = await http.post("/orders", json={"order": str(n), "item": f"item {n}"})
            ids.append(response.json()["id"])
        async with aioredis.Redis.from_url(redis_url) as raw:
            await wait_for_handled(raw, 1)
        await stop()  # two handlers are running, the rest is prefetched or waiting
    async with aioredmq.connect(redis_url) as mq, aioredis.Redis.from_url(redis_url) as raw:
        orders = mq.queue("orders")
        stats = await orders.stats()
        handled = [h.decode() for h in await lrange_bytes(raw, HANDLED)]
        assert (stats.in_flight, stats.dead) == (0, 0), "the stop left nothing held or dead"
        assert stats.consumers == {}, "the app's consumer deregistered"
        assert len(handled) + stats.ready == len(ids), "each message was handled or is back in the queue"
        assert len(handled) >= 2, "the handlers running at the stop finished"
        # The next instance of the app picks up the rest: each message exactly once overall.
        later = make_service(redis_url, delay_s=0)
        async with later:
            await wait_for_handled(raw, len(ids))
        assert sorted(h.decode() for h in await lrange_bytes(raw, HANDLED)) == sorted(ids)


async def wait_for_handled(raw: aioredis.Redis, n: int) -> None:
    with anyio.fail_after(20):
        while await raw.llen(HANDLED) < n:  # noqa: ASYNC110 - polling Redis
            await anyio.sleep(0.02)


@pytest.mark.parametrize(
    ("module", "framework_module", "extra"),
    [
        ("aioredmq.integrations.fastapi", "starlette.requests", "fastapi"),
        ("aioredmq.integrations.aiohttp", "aiohttp", "aiohttp"),
    ],
)
def test_an_integration_without_its_framework_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, framework_module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, framework_module, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'aioredmq\[{extra}\]'"):
        importlib.import_module(module)


async def test_a_service_that_cannot_start_closes_what_it_opened(redis_url: str) -> None:
    async def noop(msg: aioredmq.Message[Any]) -> None:
        pass

    service = aioredmq.Service(redis_url)
    service.add(lambda mq: mq.queue("fine"), noop)
    service.add(lambda mq: mq.queue("bad name with spaces"), noop)
    with pytest.raises(aioredmq.ConfigError):
        await service.start()
    assert not service.running
    with pytest.raises(aioredmq.ClosedError, match="not running"):
        service.client  # noqa: B018 - the property raises


async def test_a_runner_that_fails_restarts_with_backoff_and_reports_it_until_fixed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A key of another type ends the runner's consumer; an operator can fix it while the
    app runs, so the runner restarts with backoff, and health() says what happens."""
    handled: list[Any] = []

    async def keep(msg: aioredmq.Message[Any]) -> None:
        handled.append(msg.body)

    async with aioredis.Redis.from_url(redis_url) as raw:
        await raw.set("aioredmq:{wrong-type}:ready", "a string, not a list")
        service = aioredmq.Service(redis_url)
        service.add(lambda mq: mq.queue("wrong-type"), keep)
        assert not service.health().running
        assert not service.ready
        with caplog.at_level(logging.ERROR, logger="aioredmq.service"):
            await service.start()
            await wait_for(lambda: service.health().runners[0].restarts >= 2, 10, "two restarts")
        runner = service.health().runners[0]
        assert runner.name == "queue:wrong-type"
        assert "WrongTypeError" in (runner.last_error or "")
        assert not service.ready
        assert any("restarting in" in r.getMessage() for r in caplog.records)
        assert service.running, "the app keeps running without that consumer"
        await raw.delete("aioredmq:{wrong-type}:ready")  # the operator's fix
        await service.client.queue("wrong-type").publish("after the fix")
        await wait_for(lambda: handled == ["after the fix"], 20, "the runner back")
        assert service.ready
        assert service.health().runners[0].state == "running"
    await service.stop()
    assert not service.running


async def test_a_runner_with_a_bad_option_stops_once_and_is_not_restarted(redis_url: str) -> None:
    async def noop(msg: aioredmq.Message[Any]) -> None:
        pass

    service = aioredmq.Service(redis_url)
    service.add(lambda mq: mq.queue("bad-option"), noop, group="a group is for streams")
    await service.start()
    try:
        await wait_for(lambda: service.health().runners[0].state == "stopped", 10, "the runner stopped")
        await anyio.sleep(1.0)
        runner = service.health().runners[0]
        assert runner.restarts == 0
        assert "ConfigError" in (runner.last_error or "")
        assert not service.ready
    finally:
        await service.stop()
