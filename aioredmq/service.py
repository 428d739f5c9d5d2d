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
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
from redis.asyncio import Redis

from .client import Client, connect
from .errors import AioredmqError, ClosedError, ConfigError
from .idempotency import Idempotency
from .message import Message
from .partitioned import PartitionedQueue
from .queue import Queue
from .stream import Stream

__all__ = ("RunnerHealth", "Service", "ServiceHealth")

log = logging.getLogger("aioredmq.service")

Source = Queue[Any] | Stream[Any] | PartitionedQueue[Any]
Handler = Callable[[Message[Any]], Awaitable[object]]


@dataclass
class _Runner:
    source: Callable[[Client], Source]
    handler: Handler
    options: dict[str, Any] = field(default_factory=dict)


# A runner that failed waits this long before it starts again, doubling per failure in a row.
_RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class RunnerHealth:
    """One handler runner of a :class:`Service`."""

    name: str
    """The source it consumes (``queue:orders``, ``stream:events/billing``, ...)."""
    state: str
    """``"starting"`` (waiting for Redis), ``"running"``, ``"restarting"`` (after a
    failure, waiting its backoff) or ``"stopped"`` (a programming error: not restarted)."""
    restarts: int
    last_error: str | None


@dataclass(frozen=True)
class ServiceHealth:
    """What a readiness probe needs: ``ready`` when every runner consumes."""

    running: bool
    ready: bool
    runners: tuple[RunnerHealth, ...]


class Service:
    """A connection and the handlers that run while a service runs."""

    def __init__(self, url_or_client: str | Redis, **connect_options: Any) -> None:
        self._target = url_or_client
        self._connect_options = connect_options
        self._runners: list[_Runner] = []
        self._client: Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._health: list[RunnerHealth] = []

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
            sources = [runner.source(client) for runner in self._runners]
            self._health = [
                RunnerHealth(_name(src, r.options), "starting", 0, None)
                for src, r in zip(sources, self._runners, strict=True)
            ]
            for i, (runner, source) in enumerate(zip(self._runners, sources, strict=True)):
                task = loop.create_task(self._supervise(i, runner, source), name=f"aioredmq-service-{i}")
                self._tasks.append(task)
        except BaseException:
            await self.stop()  # a bad source: stop what started, close the connection
            raise

    async def _supervise(self, i: int, runner: _Runner, source: Source) -> None:
        """Run one runner for as long as the service runs. Redis being down or refusing only
        delays it (its consumer waits for Redis when it opens, and retries in its loops);
        an error that still ends the runner (a key of another type, a missing permission:
        an operator can fix both while the app runs) restarts it with backoff. An error
        that is not aioredmq's is a programming error: logged, and not restarted."""
        from .runner import run

        failures = 0
        while True:
            opened = False
            began = time.monotonic()

            def on_open() -> None:
                nonlocal opened
                opened = True
                self._set(i, state="running")

            try:
                await run(source, runner.handler, **runner.options, opened=on_open)
                error: BaseException = ClosedError("the runner's consumer ended")
            except ConfigError as exc:  # a bad option: no restart cures it
                self._set(i, state="stopped", last_error=repr(exc))
                log.error("handler runner %s stopped: %r", self._health[i].name, exc, exc_info=exc)
                return
            except AioredmqError as exc:
                error = exc
            except Exception as exc:
                self._set(i, state="stopped", last_error=repr(exc))
                log.error("handler runner %s stopped: %r", self._health[i].name, exc, exc_info=exc)
                return
            # A runner that ran a good while starts its backoff afresh.
            ran_a_while = opened and time.monotonic() - began > _RESTART_DELAYS_S[-1]
            failures = 1 if ran_a_while else failures + 1
            delay = _RESTART_DELAYS_S[min(failures, len(_RESTART_DELAYS_S)) - 1]
            self._set(i, state="restarting", restarts=self._health[i].restarts + 1, last_error=repr(error))
            log.error(
                "handler runner %s failed (%r); restarting in %.1f s",
                self._health[i].name,
                error,
                delay,
                exc_info=error if failures == 1 else None,
            )
            await anyio.sleep(delay)
            self._set(i, state="starting")

    def _set(self, i: int, **changes: Any) -> None:
        self._health[i] = dataclasses.replace(self._health[i], **changes)

    def health(self) -> ServiceHealth:
        """The state of each runner, for a readiness probe: ``health().ready`` is true while
        the service runs and every runner's consumer is open and consuming."""
        runners = tuple(self._health) if self._client is not None else ()
        running = self._client is not None
        return ServiceHealth(running, running and all(r.state == "running" for r in runners), runners)

    @property
    def ready(self) -> bool:
        """``health().ready``."""
        return self.health().ready

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


def _name(source: Source, options: dict[str, Any]) -> str:
    if isinstance(source, Stream):
        return f"stream:{source.name}/{options.get('group') or 'default'}"
    if isinstance(source, PartitionedQueue):
        return f"partitioned:{source.name}"
    return f"queue:{source.name}"
