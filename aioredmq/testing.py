"""A throwaway redis-server for tests, demos and benchmarks.

``RedisServer`` starts ``redis-server`` on a free loopback port with a private
directory, waits until it answers PING, and stops it (by PID, then waits until the
port refuses connections). Nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

__all__ = ("RedisServer", "free_port")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``with RedisServer() as server: server.url``. Extra ``redis-server`` options as
    ``("--appendonly", "yes")`` pairs in ``args``."""

    def __init__(self, *args: str, port: int | None = None, executable: str = "redis-server") -> None:
        self.args = args
        self.port = port or free_port()
        self.executable = executable
        self.dir = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        path = shutil.which(self.executable)
        if path is None:
            raise RuntimeError(f"{self.executable} not found: install it (Debian: apt-get install redis-server)")
        if not self.dir:
            self.dir = tempfile.mkdtemp(prefix="aioredmq-redis-")
        self.process = subprocess.Popen(
            [
                path,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self.dir,
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", os.path.join(self.dir, "redis.log"),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")
            time.sleep(0.02)
        return self

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "redis.log"), "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")
        return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server (SIGKILL by default) and reap it; the data directory stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(10)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            deadline = time.monotonic() + 10
            while _ping(self.port, 0.1) and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        if self.process is not None:
            self.kill(signal.SIGKILL)
            self.process = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
