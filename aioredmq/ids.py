"""Globally unique, time-ordered message ids.

An id is 32 lowercase hex digits: 12 of Unix time in milliseconds, 12 of a
random per-process node, 8 of a per-process counter. Ids from one process sort
in creation order; ids from different processes sort by millisecond. The node
is drawn again in a forked child so parent and child never share ids.
"""

from __future__ import annotations

import itertools
import os
import time

__all__ = ("id_time", "new_id", "new_ids", "stamped_id")

_node = ""
_counter: itertools.count[int] = itertools.count()
_prefix_ms = -1
_prefix = ""


def _reseed() -> None:
    global _node, _counter, _prefix_ms
    _node = os.urandom(6).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(3), "big"))
    _prefix_ms = -1


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """Return a new message id."""
    return f"{time.time_ns() // 1_000_000:012x}{_node}{next(_counter) & 0xFFFFFFFF:08x}"


def stamped_id() -> tuple[str, int]:
    """A new message id and the Unix time in milliseconds it carries (one clock read).
    The hot path of a single publish: the id's first 24 digits change once per ms."""
    global _prefix_ms, _prefix
    ms = time.time_ns() // 1_000_000
    if ms != _prefix_ms:
        _prefix_ms, _prefix = ms, f"{ms:012x}{_node}"
    return f"{_prefix}{next(_counter) & 0xFFFFFFFF:08x}", ms


def new_ids(n: int) -> list[str]:
    """``n`` new message ids, in order (one clock read for all of them)."""
    prefix = f"{time.time_ns() // 1_000_000:012x}{_node}"
    counter = _counter
    return [f"{prefix}{next(counter) & 0xFFFFFFFF:08x}" for _ in range(n)]


def id_time(message_id: str) -> float:
    """The Unix time (seconds) at which an id was made."""
    return int(message_id[:12], 16) / 1000.0
