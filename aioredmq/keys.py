"""Where every Redis key name is built.

All keys of one queue share the hash tag ``{name}`` so that every multi-key
command and Lua script touches a single Cluster slot::

    <prefix>:{<name>}:ready               list; producers LPUSH, consumers take from the right
    <prefix>:{<name>}:inflight:<consumer> list; what one consumer holds, oldest at the right
    <prefix>:{<name>}:leases              zset; consumer -> lease deadline (ms)
    <prefix>:{<name>}:registry            zset; consumer -> last take or heartbeat (ms): every
                                          consumer that may have an in-flight list, so recovery
                                          finds the list even when its lease entry is lost
    <prefix>:{<name>}:lease_lengths       hash; consumer -> its lease length (ms), so that
                                          ``aioredmq stats`` ages each heartbeat by its own lease
    <prefix>:{<name>}:delayed             zset; message id -> due time (ms): delayed publishes, retries
    <prefix>:{<name>}:scheduled           hash; message id -> envelope, for the delayed set
    <prefix>:{<name>}:dead                list; dead-letter records, newest at the left
    <prefix>:{<name>}:done                zset; message id -> expiry (ms): processed-id markers
    <prefix>:{<name>}:producer:<id>       string; last batch sequence a producer applied

A stream's keys follow the same rule::

    <prefix>:{<name>}:stream              stream; one entry per message, field 'm' = envelope
    <prefix>:{<name>}:dead:<group>        list; one consumer group's dead-letter records
    <prefix>:{<name>}:done:<group>        zset; one group's processed-id markers
    <prefix>:{<name>}:dropped             counter; entries a cap removed before every group acked them
    <prefix>:{<name>}:delayed, :scheduled as for queues; due entries are appended to the stream
    <prefix>:{<name>}:producer:<id>       string; as for queues

A partitioned queue ``<name>`` of N partitions is N list queues named ``<name>#<i>``,
each with its own hash tag ``{<name>#<i>}`` so that they spread over Cluster nodes, and
the keys that say who holds which partition::

    <prefix>:{<name>}:members             zset; member consumer -> membership deadline (ms)
    <prefix>:{<name>}:holders             hash; partition -> the member holding it
    <prefix>:{<name>}:holds               zset; partition -> hold deadline (ms)

and, in each partition's own slot, its fencing token (see the ``fence`` script)::

    <prefix>:{<name>#<i>}:fence           string; '<epoch> <holder>', a greater epoch for every holder

Pub/sub channel names follow it too, so a sharded channel lands with its name's slot::

    <prefix>:{<name>}:channel             a user's pub/sub channel
    <prefix>:{<name>}:due                 notices of a new earliest due time of a queue or stream
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ("PartitionKeys", "QueueKeys", "StreamKeys", "channel_name", "check_name")

_NAME = re.compile(r"^[A-Za-z0-9_.\-/:@]{1,200}$")


def check_name(knob: str, value: str) -> str:
    """Validate a queue name, prefix or consumer name: no braces, spaces or control bytes."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{knob}={value!r} is invalid: use 1-200 characters from letters, digits and "
            "'_.-/:@' (braces are reserved for the Cluster hash tag)"
        )
    return value


def channel_name(prefix: str, name: str) -> str:
    """The pub/sub channel a user's channel ``name`` (or glob pattern) is sent on."""
    return f"{prefix}:{{{name}}}:channel"


@dataclass(frozen=True, slots=True)
class _Keys:
    prefix: str
    name: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.name}}}"

    def producer(self, producer_id: str) -> str:
        return f"{self.base}:producer:{producer_id}"

    @property
    def delayed(self) -> str:
        return f"{self.base}:delayed"

    @property
    def scheduled(self) -> str:
        return f"{self.base}:scheduled"

    @property
    def due(self) -> str:
        """The pub/sub channel told of a new earliest due time."""
        return f"{self.base}:due"


@dataclass(frozen=True, slots=True)
class QueueKeys(_Keys):
    """The key names of one list queue."""

    @property
    def ready(self) -> str:
        return f"{self.base}:ready"

    @property
    def leases(self) -> str:
        return f"{self.base}:leases"

    @property
    def registry(self) -> str:
        return f"{self.base}:registry"

    @property
    def lease_lengths(self) -> str:
        return f"{self.base}:lease_lengths"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def done(self) -> str:
        return f"{self.base}:done"

    @property
    def fence(self) -> str:
        """A partition's fencing token: '<epoch> <holder>', a new epoch for every holder."""
        return f"{self.base}:fence"

    def inflight(self, consumer: str) -> str:
        return f"{self.base}:inflight:{consumer}"

    def inflight_of(self, member: bytes) -> bytes:
        """The in-flight list of a consumer named by a raw member of the leases set."""
        return f"{self.base}:inflight:".encode() + member


@dataclass(frozen=True, slots=True)
class StreamKeys(_Keys):
    """The key names of one stream."""

    @property
    def stream(self) -> str:
        return f"{self.base}:stream"

    @property
    def dropped(self) -> str:
        return f"{self.base}:dropped"

    def dead(self, group: str) -> str:
        return f"{self.base}:dead:{group}"

    def done(self, group: str) -> str:
        return f"{self.base}:done:{group}"


@dataclass(frozen=True, slots=True)
class PartitionKeys(_Keys):
    """Who holds which partition of a partitioned queue."""

    @property
    def members(self) -> str:
        return f"{self.base}:members"

    @property
    def holders(self) -> str:
        return f"{self.base}:holders"

    @property
    def holds(self) -> str:
        return f"{self.base}:holds"

    def partition(self, index: int) -> str:
        """The queue name of partition ``index``."""
        return f"{self.name}#{index}"
