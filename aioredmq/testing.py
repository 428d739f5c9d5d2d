"""A throwaway redis-server for tests, demos and benchmarks.

``RedisServer`` starts ``redis-server`` on a free loopback port with a private
directory, waits until it answers PING, and stops it (by PID, then waits until the
port refuses connections). Nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Self

__all__ = ("RedisClusterServers", "RedisSentinelServers", "RedisServer", "free_port")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class _Started:
    """``with server:`` starts it and stops it."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServer(_Started):
    """``with RedisServer() as server: server.url``. Extra ``redis-server`` options as
    ``("--appendonly", "yes")`` pairs in ``args``. ``executable`` defaults to
    ``$AIOREDMQ_REDIS_SERVER``, else ``redis-server`` on the PATH."""

    def __init__(self, *args: str, port: int | None = None, executable: str | None = None) -> None:
        self.args = args
        self.port = port or free_port()
        # Another build of the server (an older Redis, say) by its path, for a whole test run.
        self.executable = executable or os.environ.get("AIOREDMQ_REDIS_SERVER") or "redis-server"
        self.dir = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> Self:
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

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict (empty when the server does not answer)."""
        return _info(self.port, section)

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


def _info(port: int, section: str, timeout_s: float = 0.5) -> dict[str, str]:
    """``INFO section`` of the server on ``port`` as a dict (empty when it does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while not data.endswith(b"\r\n\r\n") and len(data) < 1_000_000:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"$") and data.count(b"\r\n") >= 2:
                    header, _, rest = data.partition(b"\r\n")
                    if len(rest) >= int(header[1:]) + 2:
                        break
    except OSError:
        return {}
    lines = data.decode("utf-8", "replace").splitlines()[1:]
    return dict(line.split(":", 1) for line in lines if ":" in line)


class RedisClusterServers(_Started):
    """``with RedisClusterServers() as cluster: cluster.url``: a throwaway cluster on
    loopback, ``masters`` masters with one replica each, ready once every slot is served
    and every replica's link to its master is up (a master killed before that would never
    fail over). ``node_timeout_ms`` is how soon a dead master is failed over."""

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 1000) -> None:
        args = (
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0",
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        self.servers = [RedisServer(*args, port=free_cluster_port()) for _ in range(2 * masters)]

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def start(self, timeout_s: float = 30.0) -> Self:
        try:
            for server in self.servers:
                server.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli not found: install it (Debian: apt-get install redis-server)")
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s,
            )  # fmt: skip
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every live replica's link is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [s for s in self.servers if s.process is not None and _ping(s.port)]
            replication = [_info(s.port, "replication") for s in live]
            replicas_up = all(r.get("master_link_status") == "up" for r in replication if r.get("role") == "slave")
            if live and replicas_up and self._slots_ok(live):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {self.ports} did not become ready in {timeout_s}s")

    @staticmethod
    def _slots_ok(live: list[RedisServer]) -> bool:
        for server in live:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as s:
                    s.sendall(b"CLUSTER INFO\r\n")
                    if b"cluster_state:ok" not in s.recv(65536):
                        return False
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class RedisSentinelServers(_Started):
    """``with RedisSentinelServers() as s: s.sentinels``: a throwaway master, one replica
    and three sentinels watching them as ``service``, each sentinel with its own writable
    config file; a master that stops answering for ``down_after_ms`` is failed over."""

    def __init__(self, service: str = "aioredmq", *, down_after_ms: int = 1000) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.master = RedisServer("--repl-diskless-sync-delay", "0")
        self.replica: RedisServer | None = None
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._dir = ""

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def start(self, timeout_s: float = 30.0) -> Self:
        try:
            self.master.start()
            self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port)).start()
            self._dir = tempfile.mkdtemp(prefix="aioredmq-sentinel-")
            for port in self.sentinel_ports:
                conf = os.path.join(self._dir, f"sentinel-{port}.conf")
                with open(conf, "w") as f:
                    f.write(
                        f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                        f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.service} 5000\n"
                        f"sentinel parallel-syncs {self.service} 1\n"
                    )
                command = [shutil.which("redis-server") or "redis-server", conf, "--sentinel"]
                with open(os.path.join(self._dir, f"sentinel-{port}.log"), "wb") as log:
                    self._sentinels.append(subprocess.Popen(command, stdout=log, stderr=log))
            deadline = time.monotonic() + timeout_s
            while not self._ready():
                if time.monotonic() > deadline:
                    raise RuntimeError("the sentinels did not come up watching a linked master and replica")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.replica is not None
        if self.replica.info("replication").get("master_link_status") != "up":
            return False
        for port in self.sentinel_ports:
            info = _info(port, "sentinel")
            if "master0" not in info or "status=ok" not in info["master0"] or "slaves=1" not in info["master0"]:
                return False
            if "sentinels=3" not in info["master0"]:
                return False
        return True

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self._sentinels.clear()
        for server in (self.master, self.replica):
            if server is not None:
                server.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
