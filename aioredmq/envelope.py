"""The wire format of a message, and of a dead-letter record.

An envelope is one header line, then the headers as JSON, then the body::

    amq1 <id> <attempts> <published_ms> <codec> <headers_len>\\n<headers JSON><body>

``attempts`` counts the deliveries that ended without an ack (failures, crashes,
lease expiries); a message's delivery count is ``attempts + 1``. The Lua reaper
rewrites that one field in place, so the format must stay parseable there.

A dead-letter record wraps the original bytes, decodable or not::

    amqdead1 <dead_ms> <reason_len>\\n<reason><original bytes>
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

from .errors import DecodeError

__all__ = (
    "DeadRecord",
    "Envelope",
    "decode",
    "decode_dead",
    "encode",
    "encode_dead",
    "encode_many",
    "with_attempts",
)

MAGIC = b"amq1"
# Anchored and bounded: a match never reads past the header line. Never more than the
# Lua scripts parse ('^amq1 (%x+) (%d+) '): they must agree.
_HEADER = re.compile(rb"amq1 ([0-9a-f]{1,64}) ([0-9]{1,9}) ([0-9]{1,15}) ([A-Za-z]{1,32}) ([0-9]{1,9})\n")
DEAD_MAGIC = b"amqdead1"
_MAX_HEADER_LINE = 128
NO_HEADERS: MappingProxyType[str, str] = MappingProxyType({})
"""The headers of a message that has none: shared, so read-only."""


class Envelope(NamedTuple):
    """A decoded envelope (a tuple: made once per delivered message, so it must be cheap)."""

    id: str
    attempts: int
    published_ms: int
    codec: str
    headers: Mapping[str, str]
    body: bytes


def _after_id(attempts: int, published_ms: int, codec: str, headers: dict[str, str] | None) -> bytes:
    """Everything of the header after the id, then the headers: the one place the format is spelled."""
    h = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
    return b" %d %d %b %d\n%b" % (attempts, published_ms, codec.encode(), len(h), h)


def encode(
    message_id: str,
    attempts: int,
    published_ms: int,
    codec: str,
    headers: dict[str, str] | None,
    body: bytes,
) -> bytes:
    return MAGIC + b" " + message_id.encode() + _after_id(attempts, published_ms, codec, headers) + body


def encode_many(
    message_ids: list[str],
    published_ms: int,
    codec: str,
    headers: dict[str, str] | None,
    bodies: list[bytes],
) -> list[bytes]:
    """Envelopes of a batch that shares its publish time, codec and headers (attempts 0)."""
    tail = _after_id(0, published_ms, codec, headers)
    head = MAGIC + b" "
    return [head + mid.encode() + tail + body for mid, body in zip(message_ids, bodies, strict=True)]


_new = tuple.__new__


def decode(raw: bytes) -> Envelope:
    """Parse an envelope; raise :class:`DecodeError` saying what is wrong."""
    header = _HEADER.match(raw)
    if header is None:
        _malformed(raw)
    mid, attempts, published, codec, hlen = header.groups()
    start = header.end()
    if hlen == b"0":
        fields = (mid.decode(), int(attempts), int(published), codec.decode(), NO_HEADERS, raw[start:])
        return _new(Envelope, fields)  # what Envelope(...) does, at half the cost
    n_header = int(hlen)
    if start + n_header > len(raw):
        raise DecodeError("envelope is truncated inside its headers")
    try:
        parsed: Any = json.loads(raw[start : start + n_header])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"envelope headers are not JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise DecodeError("envelope headers must be a JSON object of strings")
    return Envelope(mid.decode(), int(attempts), int(published), codec.decode(), parsed, raw[start + n_header :])


def _malformed(raw: bytes) -> NoReturn:
    """Say why ``raw`` is not an envelope."""
    nl = raw.find(b"\n", 0, _MAX_HEADER_LINE)
    if nl < 0 or not raw.startswith(MAGIC + b" "):
        raise DecodeError("not an aioredmq envelope (foreign writer or corrupt bytes)")
    raise DecodeError(f"envelope header is malformed: {raw[:nl][:80]!r}")


def with_attempts(raw: bytes, attempts: int) -> bytes:
    """The same (already decoded) envelope with another attempt count."""
    nl = raw.index(b"\n")
    fields = raw[:nl].split(b" ")
    fields[2] = b"%d" % attempts
    return b" ".join(fields) + raw[nl:]


@dataclass(frozen=True, slots=True)
class DeadRecord:
    """A dead-lettered message: why, when, and its original bytes."""

    reason: str
    dead_ms: int
    raw: bytes

    @property
    def envelope(self) -> Envelope | None:
        """The original envelope, or ``None`` when the original bytes never decoded."""
        try:
            return decode(self.raw)
        except DecodeError:
            return None


def encode_dead(raw: bytes, reason: str, dead_ms: int) -> bytes:
    r = reason.encode("utf-8", "replace")
    return b"%b %d %d\n%b%b" % (DEAD_MAGIC, dead_ms, len(r), r, raw)


def decode_dead(record: bytes) -> DeadRecord:
    nl = record.find(b"\n", 0, 64)
    fields = record[:nl].split(b" ") if nl > 0 else []
    if len(fields) != 3 or fields[0] != DEAD_MAGIC:
        # Written by something else: keep it visible rather than hide it.
        return DeadRecord("unrecognised dead-letter record", 0, record)
    try:
        dead_ms, rlen = int(fields[1]), int(fields[2])
    except ValueError:
        return DeadRecord("unrecognised dead-letter record", 0, record)
    start = nl + 1
    reason = record[start : start + rlen].decode("utf-8", "replace")
    return DeadRecord(reason, dead_ms, record[start + rlen :])
