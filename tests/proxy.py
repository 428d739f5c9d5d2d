"""A loopback TCP proxy that injects network faults between a client and a real server.

``FaultProxy`` listens on 127.0.0.1 (a free port) and forwards every connection to a
target on the loopback interface. Faults can be switched on and off while traffic flows:

* :meth:`FaultProxy.pause` / :meth:`FaultProxy.resume`: stop forwarding both ways; what
  was read is held (and the rest waits in the kernel buffers) until resumed;
* :attr:`FaultProxy.latency_s`: a delay added before each forwarded chunk;
* :attr:`FaultProxy.drop_replies`: discard everything the server sends;
* :meth:`FaultProxy.sever_all`: reset every open connection (RST, via ``SO_LINGER`` 0);
* :meth:`FaultProxy.cut_after`: reset the connection that carries the N-th byte in a
  direction (counted from the call), after forwarding exactly N bytes;
* :meth:`FaultProxy.fail_reply`: when a client->server chunk containing a marker (a
  command name, a script SHA) is forwarded, let the server run it, then drop its reply
  and reset that connection: the "applied, but the reply was lost" case;
* :meth:`FaultProxy.delay_reply`: the same match, but the reply is only held back for a
  while, so replies on different connections arrive in another order than the commands ran.

Each connection is two pump loops; each iteration waits on one read, so every loop
ends when its side closes, when the connection is reset, or when the proxy closes.
Replies are matched to requests by arrival: this suits clients that wait for a reply
before sending the next command on a connection (redis-py outside pipelines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

__all__ = ("Direction", "FaultProxy", "ReplyFault")

Direction = Literal["c2s", "s2c"]
"""``c2s``: client to server (requests); ``s2c``: server to client (replies)."""

_LOOPBACK_NAMES = frozenset({"localhost"})
_CHUNK = 64 * 1024


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close one side at once with a TCP RST (``SO_LINGER`` on, timeout 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class ReplyFault:
    """One armed fault on the reply to a marked request: dropped with a reset of its connection
    (:meth:`FaultProxy.fail_reply`) or held back (:meth:`FaultProxy.delay_reply`)."""

    marker: bytes
    times: int
    keep_reply: Callable[[bytes], bool] | None = None
    delay_s: float | None = None
    """None: drop the reply and reset the connection; otherwise hold the reply this long."""
    matched: int = 0
    """Requests containing the marker that were forwarded while the fault was armed."""
    fired: int = 0
    """Replies dropped (each followed by a reset of its connection) or held back."""
    requests: list[bytes] = field(default_factory=list)
    """The request chunk behind each fired fault."""
    replies: list[bytes] = field(default_factory=list)
    """The first reply chunk that was dropped (or held back), per fired fault."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the fault has fired ``times`` times."""
    _pending: int = 0

    @property
    def armed(self) -> bool:
        return self.fired + self._pending < self.times

    async def wait(self, timeout_s: float = 10.0) -> None:
        """Wait until the fault fired ``times`` times; fail with a clear message otherwise."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"fault on {self.marker!r} fired {self.fired}/{self.times} times in {timeout_s}s "
                f"(matched {self.matched} requests)"
            ) from None


@dataclass(eq=False)
class _Cut:
    direction: Direction
    remaining: int


class _Link:
    """One proxied connection: the client's stream pair and the server's."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.closed = False
        self._closed_event = asyncio.Event()
        self.pending: tuple[ReplyFault, bytes] | None = None  # a matched request, whose reply is to go
        self._tail = b""  # the end of the last request chunk, so a marker split in two still matches

    def _mark_closed(self) -> None:
        self.closed = True
        self._closed_event.set()
        if self.pending is not None:
            # The connection ended before the reply came: the fault did not fire, it stays armed.
            self.pending[0]._pending -= 1
            self.pending = None

    def sever(self) -> None:
        """Reset both sides (RST); the pumps see the reset and stop."""
        if self.closed:
            return
        self._mark_closed()
        self.proxy.severed += 1
        _reset(self.client_writer)
        _reset(self.server_writer)

    def close(self) -> None:
        """Close both sides in an orderly way (FIN)."""
        if self.closed:
            return
        self._mark_closed()
        self.client_writer.close()
        self.server_writer.close()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump("c2s", self.client_reader, self.server_writer))
                tg.create_task(self._pump("s2c", self.server_reader, self.client_writer))
        finally:
            self.close()
            for writer in (self.client_writer, self.server_writer):
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _pump(self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy = self.proxy
        while not self.closed:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                data = b""
            if not data or self.closed:
                break
            proxy.received[direction] += len(data)
            await self._unpaused()
            if proxy.latency_s > 0:
                await asyncio.sleep(proxy.latency_s)
            if self.closed:
                break
            if direction == "c2s":
                data, cut = proxy._take_cut(direction, data)
                self._match(data)
            else:
                fault = self._fire(data) if self.pending is not None else None
                if fault is not None:
                    if fault.delay_s is None:
                        break  # dropped, and the connection reset
                    await asyncio.sleep(fault.delay_s)
                    if self.closed:
                        break
                if proxy.drop_replies:
                    proxy.dropped_bytes += len(data)
                    continue
                data, cut = proxy._take_cut(direction, data)
            proxy.forwarded[direction] += len(data)
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                break
            if cut:
                self.sever()
                break
        self.close()

    async def _unpaused(self) -> None:
        """Return once the proxy is not paused, or this connection (or the proxy) closed."""
        if self.proxy._resumed.is_set():
            return
        waiters = [
            asyncio.ensure_future(self.proxy._resumed.wait()),
            asyncio.ensure_future(self._closed_event.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _match(self, data: bytes) -> None:
        """Arm this connection's reply drop if the request carries an armed fault's marker."""
        tail = self._tail
        window = tail + data
        self._tail = data[-64:]
        if self.pending is not None:
            return
        for fault in self.proxy._faults:
            # The marker must end inside this chunk: one seen in an earlier request does not count.
            if fault.armed and window.find(fault.marker, max(0, len(tail) - len(fault.marker) + 1)) >= 0:
                fault.matched += 1
                fault._pending += 1
                self.pending = (fault, data)
                return

    def _fire(self, data: bytes) -> ReplyFault | None:
        """The first reply chunk after a matched request. Return the fault when it fires:
        a drop fault resets the connection here; a delay fault is left to the caller to wait.
        None when the fault's ``keep_reply`` lets the reply through (the fault stays armed)."""
        assert self.pending is not None
        fault, request = self.pending
        self.pending = None
        fault._pending -= 1
        if fault.keep_reply is not None and fault.keep_reply(data):
            return None
        fault.fired += 1
        fault.requests.append(request)
        fault.replies.append(data)
        if fault.delay_s is None:
            self.proxy.dropped_bytes += len(data)
            self.sever()
        if fault.fired >= fault.times:
            fault.done.set()
            with contextlib.suppress(ValueError):
                self.proxy._faults.remove(fault)
        return fault


class FaultProxy:
    """``async with FaultProxy(host, port) as proxy:`` connect clients to ``127.0.0.1:proxy.port``."""

    def __init__(self, target_host: str, target_port: int, *, connect_timeout_s: float = 5.0) -> None:
        if not _is_loopback(target_host):
            raise ValueError(f"FaultProxy forwards to the loopback interface only, not {target_host!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout_s = connect_timeout_s
        self.host = "127.0.0.1"
        self.port = 0
        self.latency_s = 0.0
        """Delay added before each forwarded chunk, both ways."""
        self.drop_replies = False
        """Discard what the server sends (the connections stay open)."""
        self.connections = 0
        """Connections accepted so far."""
        self.severed = 0
        """Connections reset by a fault (``sever_all``, ``cut_after``, ``fail_reply``)."""
        self.dropped_bytes = 0
        self.received: dict[Direction, int] = {"c2s": 0, "s2c": 0}
        """Bytes read from each side (forwarded or not)."""
        self.forwarded: dict[Direction, int] = {"c2s": 0, "s2c": 0}
        """Bytes passed on to the other side."""
        self._faults: list[ReplyFault] = []
        self._cut: _Cut | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closed = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, close every connection and wait for their pumps to end."""
        if self._closed:
            return
        self._closed = True
        self._resumed.set()  # paused pumps wake up, see the close and stop
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        if self._tasks:
            # Closing both sides ends every pump; cancel only what did not end in time.
            _, late = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        """A ``redis://`` URL (database 0) that reaches the target through this proxy."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def active(self) -> int:
        """Connections open right now."""
        return len(self._links)

    # -- faults ----------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding both ways; nothing is lost, it waits until :meth:`resume`."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def sever_all(self) -> int:
        """Reset (RST) every open connection; return how many were reset."""
        links = [link for link in self._links if not link.closed]
        for link in links:
            link.sever()
        return len(links)

    def cut_after(self, direction: Direction, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes in ``direction`` (over any connection), then reset
        the connection that carried the last of them. One shot; replaces an earlier cut."""
        if nbytes < 1:
            raise ValueError("nbytes must be at least 1")
        self._cut = _Cut(direction, nbytes)

    @property
    def cut_pending(self) -> bool:
        return self._cut is not None

    def fail_reply(
        self, marker: bytes, *, times: int = 1, keep_reply: Callable[[bytes], bool] | None = None
    ) -> ReplyFault:
        """Arm a fault for the next ``times`` requests that contain ``marker``.

        Each such request is forwarded; the first reply chunk the server sends back is
        dropped and the connection is reset, so the client sees its connection fail
        after the server applied the command. ``keep_reply(first_reply_chunk)`` returning
        true lets that reply through and keeps the fault armed (for example to skip an
        error reply, or an empty result of a blocking command that timed out).
        """
        return self._arm(ReplyFault(marker, times, keep_reply))

    def delay_reply(
        self, marker: bytes, delay_s: float, *, times: int = 1, keep_reply: Callable[[bytes], bool] | None = None
    ) -> ReplyFault:
        """Like :meth:`fail_reply`, but the reply is held back ``delay_s`` seconds and then
        forwarded (so a reply on another connection can overtake it); nothing is reset."""
        if delay_s <= 0:
            raise ValueError("delay_s must be positive")
        return self._arm(ReplyFault(marker, times, keep_reply, delay_s))

    def _arm(self, fault: ReplyFault) -> ReplyFault:
        if not fault.marker:
            raise ValueError("marker must not be empty")
        if fault.times < 1:
            raise ValueError("times must be at least 1")
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Disarm every fault and restore normal forwarding (pending reply drops still happen)."""
        self._faults.clear()
        self._cut = None
        self.latency_s = 0.0
        self.drop_replies = False
        self.resume()

    # -- internals -------------------------------------------------------------------

    def _take_cut(self, direction: Direction, data: bytes) -> tuple[bytes, bool]:
        """Trim ``data`` to what an armed cut still lets through; True when the cut is reached."""
        cut = self._cut
        if cut is None or cut.direction != direction:
            return data, False
        if len(data) < cut.remaining:
            cut.remaining -= len(data)
            return data, False
        self._cut = None
        return data[: cut.remaining], True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        link: _Link | None = None
        try:
            if self._closed:
                return
            try:
                server = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout_s
                )
            except (OSError, TimeoutError):
                _reset(writer)
                return
            link = _Link(self, (reader, writer), server)
            self._links.add(link)
            await link.run()
        finally:
            if link is not None:
                self._links.discard(link)
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._tasks.discard(task)
