"""FastAPI and Starlette: a lifespan that runs an :class:`aioredmq.Service`, and
dependencies that hand endpoints its client or a queue.

    service = aioredmq.Service("redis://localhost:6379/0")
    app = FastAPI(lifespan=lifespan(service))

    @app.post("/orders")
    async def order(body: dict, orders: Queue[dict] = Depends(queue_dependency("orders"))) -> dict:
        return {"id": await orders.publish(body)}

The lifespan starts the service before the app takes requests and stops it gracefully
after the last one (invariant 6). Compose it with your own lifespan by entering the
service there instead: ``async with service: yield``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

try:
    from starlette.requests import Request
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aioredmq.integrations.fastapi needs FastAPI or Starlette: pip install 'aioredmq[fastapi]'"
    ) from exc

from ..client import Client
from ..queue import Queue
from ..service import Service
from ..stream import Stream

__all__ = ("client_dependency", "lifespan", "queue_dependency", "stream_dependency")


def lifespan(service: Service) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)``; it also puts
    the service in ``app.state.aioredmq``, where the dependencies find it."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        app.state.aioredmq = service
        async with service:
            yield

    return run


def _service(request: Request) -> Service:
    service: Service = request.app.state.aioredmq
    return service


def client_dependency(request: Request) -> Client:
    """``Depends(client_dependency)``: the running service's client."""
    return _service(request).client


def queue_dependency(name: str, **options: Any) -> Callable[[Request], Queue[Any]]:
    """``Depends(queue_dependency("orders"))``: that queue of the running service's client."""

    def dependency(request: Request) -> Queue[Any]:
        return _service(request).client.queue(name, **options)

    return dependency


def stream_dependency(name: str, **options: Any) -> Callable[[Request], Stream[Any]]:
    """``Depends(stream_dependency("events"))``: that stream of the running service's client."""

    def dependency(request: Request) -> Stream[Any]:
        return _service(request).client.stream(name, **options)

    return dependency
