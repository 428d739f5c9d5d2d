"""The wire format: round trips, attempt rewrites, and a decoder that only ever raises DecodeError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioredmq.envelope import decode, decode_dead, encode, encode_dead, with_attempts
from aioredmq.errors import DecodeError
from aioredmq.ids import id_time, new_id

headers_st = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)


@given(body=st.binary(max_size=300), headers=headers_st, attempts=st.integers(0, 10_000))
def test_round_trip(body: bytes, headers: dict[str, str], attempts: int) -> None:
    mid = new_id()
    raw = encode(mid, attempts, 1_700_000_000_123, "raw", headers, body)
    env = decode(raw)
    assert (env.id, env.attempts, env.published_ms, env.codec, env.headers, env.body) == (
        mid,
        attempts,
        1_700_000_000_123,
        "raw",
        headers,
        body,
    )


@given(body=st.binary(max_size=100), attempts=st.integers(0, 50), new=st.integers(0, 10**9 - 1))
def test_with_attempts_changes_only_the_count(body: bytes, attempts: int, new: int) -> None:
    raw = encode(new_id(), attempts, 5, "json", {"k": "v"}, body)
    again = decode(with_attempts(raw, new))
    before = decode(raw)
    assert again.attempts == new
    assert (again.id, again.body, again.headers, again.published_ms) == (
        before.id,
        before.body,
        before.headers,
        before.published_ms,
    )


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=500)
@given(pos=st.integers(0, 200), byte=st.integers(0, 255), cut=st.integers(0, 200))
def test_mutated_envelopes_raise_only_decode_error(pos: int, byte: int, cut: int) -> None:
    raw = bytearray(encode(new_id(), 1, 2, "json", {"trace": "abc"}, b'{"a": 1}'))
    raw[pos % len(raw)] = byte
    for candidate in (bytes(raw), bytes(raw[: cut % len(raw)])):
        with contextlib.suppress(DecodeError):
            decode(candidate)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not an aioredmq envelope"),
        (b'{"a": 1}', "not an aioredmq envelope"),
        (b"amq1 abc 0 1 json\n", "malformed"),
        (b"amq1 abc x 1 json 0\n", "malformed"),
        (b"amq1 abc 0 1 json 50\n{}", "truncated"),
        (b"amq1 abc 0 1 json 2\n[]", "object of strings"),
        (b"amq1 abc -1 1 json 0\n", "malformed"),
        (b"amq1 ABC 0 1 json 0\n", "malformed"),
        (b"amq1 abc \xd9\xa3 1 json 0\n", "malformed"),
    ],
)
def test_decode_says_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode(data)


def test_dead_record_round_trip_keeps_undecodable_bytes() -> None:
    garbage = b"\xff\x00not an envelope\n"
    record = decode_dead(encode_dead(garbage, "undecodable: x\ny", 1234))
    assert (record.reason, record.dead_ms, record.raw) == ("undecodable: x\ny", 1234, garbage)
    assert record.envelope is None
    good = encode(new_id(), 0, 1, "json", None, b"1")
    assert decode_dead(encode_dead(good, "r", 1)).envelope == decode(good)


def test_foreign_dead_record_is_kept_visible() -> None:
    record = decode_dead(b"something else entirely")
    assert record.reason == "unrecognised dead-letter record"
    assert record.raw == b"something else entirely"


def test_ids_are_unique_time_ordered_and_fixed_width() -> None:
    ids = [new_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert {len(i) for i in ids} == {32}
    assert abs(id_time(ids[0]) - id_time(ids[-1])) < 60
