"""aiohttp: run an :class:`aioredmq.Service` through ``app.cleanup_ctx``.

    service = aioredmq.Service("redis://localhost:6379/0")
    app = web.Application()
    setup(app, service)

    async def order(request: web.Request) -> web.Response:
        message_id = await queue(request, "orders").publish(await request.json())
        return web.json_response({"id": message_id})

The service starts with the app and stops gracefully on cleanup (invariant 6).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aioredmq.integrations.aiohttp needs aiohttp: pip install 'aioredmq[aiohttp]'") from exc

from ..client import Client
from ..queue import Queue
from ..service import Service
from ..stream import Stream

__all__ = ("SERVICE", "client", "queue", "setup", "stream")

SERVICE = web.AppKey("aioredmq", Service)
"""Where :func:`setup` puts the service: ``app[SERVICE]``."""


def setup(app: web.Application, service: Service) -> None:
    """Run ``service`` for as long as ``app`` runs."""
    app[SERVICE] = service

    async def run(app: web.Application) -> AsyncIterator[None]:
        async with service:
            yield

    app.cleanup_ctx.append(run)


def client(request: web.Request) -> Client:
    """The running service's client."""
    return request.app[SERVICE].client


def queue(request: web.Request, name: str, **options: Any) -> Queue[Any]:
    return client(request).queue(name, **options)


def stream(request: web.Request, name: str, **options: Any) -> Stream[Any]:
    return client(request).stream(name, **options)
