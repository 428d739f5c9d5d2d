"""Consumers inside a web service: open the connection, run the handlers in the
background, stop them gracefully. The framework integrations (``aioredmq.integrations``)
call :meth:`Service.start` and :meth:`Service.stop` from the app's lifespan.

    service = aioredmq.Service("redis://localhost:6379/0")

    @service.handler("orders", concurrency=8)
    async def handle(msg: aioredmq.Message[dict]) -> None: ...

Stopping follows invariant 6: delivery stops at once, running handlers get ``grace_s``
to finish, prefetched messages go back to the front of their queue, acks and publishes
are flushed, and only then is the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
from redis.asyncio import Redis

from .client import Client, connect
from .errors import ClosedError, ConfigError
from .idempotency import Idempotency
from .message import Message
from .partitioned import PartitionedQueue
from .queue import Queue
from .stream import Stream

__all__ = ("Service",)

log = logging.getLogger("aioredmq.service")

Source = Queue[Any] | Stream[Any] | PartitionedQueue[Any]
Handler = Callable[[Message[Any]], Awaitable[object]]


@dataclass
class _Runner:
    source: Callable[[Client], Source]
    handler: Handler
    options: dict[str, Any] = field(default_factory=dict)


class Service:
    """A connection and the handlers that run while a service runs."""

    def __init__(self, url_or_client: str | Redis, **connect_options: Any) -> None:
        self._target = url_or_client
        self._connect_options = connect_options
        self._runners: list[_Runner] = []
        self._client: Client | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- what runs ---------------------------------------------------------------------

    def add(
        self,
        source: Callable[[Client], Source],
        handler: Handler,
        *,
        group: str | None = None,
        concurrency: int = 16,
        prefetch: int | None = None,
        handler_timeout_s: float | None = None,
        grace_s: float = 30.0,
        name: str | None = None,
        idempotency: Idempotency | None = None,
    ) -> None:
        """Run ``handler`` on ``source(client)`` (a queue, stream or partitioned queue
        made from the open client) while the service runs; the options are
        :meth:`Client.run`'s."""
        if self._client is not None:
            raise ConfigError("add handlers before the service starts")
        options = {
            "group": group,
            "concurrency": concurrency,
            "prefetch": prefetch,
            "handler_timeout_s": handler_timeout_s,
            "grace_s": grace_s,
            "name": name,
            "idempotency": idempotency,
        }
        self._runners.append(_Runner(source, handler, options))

    def handler(
        self, queue: str | None = None, *, stream: str | None = None, group: str | None = None, **options: Any
    ) -> Callable[[Handler], Handler]:
        """Decorate a handler of the queue ``queue`` (or of ``stream``'s ``group``)."""
        if (queue is None) == (stream is None):
            raise ConfigError("say exactly one of queue= or stream=")

        def register(fn: Handler) -> Handler:
            if stream is not None:
                self.add(lambda mq: mq.stream(stream), fn, group=group, **options)
            else:
                assert queue is not None
                self.add(lambda mq: mq.queue(queue), fn, **options)
            return fn

        return register

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The open client: publish through it (``service.client.queue(name)``)."""
        if self._client is None:
            raise ClosedError("the service is not running: it starts with the app (lifespan / cleanup_ctx)")
        return self._client

    @property
    def running(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        """Connect and start every handler in the background."""
        if self._client is not None:
            raise ConfigError("the service is already running")
        client = connect(self._target, **self._connect_options)
        await client.__aenter__()
        self._client = client
        loop = asyncio.get_running_loop()
        try:
            for i, runner in enumerate(self._runners):
                source = runner.source(client)
                coro = client.run(source, runner.handler, **runner.options)
                task = loop.create_task(coro, name=f"aioredmq-service-{i}")
                task.add_done_callback(self._ended)
                self._tasks.append(task)
        except BaseException:
            await self.stop()  # a bad source: stop what started, close the connection
            raise

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("a handler runner stopped: %r", task.exception(), exc_info=task.exception())

    async def stop(self) -> None:
        """Stop the handlers gracefully, then flush and close the connection."""
        tasks, self._tasks = self._tasks, []
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()  # one cancel: the runner stops delivery and gives handlers grace_s
            if tasks:
                await asyncio.wait(tasks)  # handlers finishing may still use the client
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
