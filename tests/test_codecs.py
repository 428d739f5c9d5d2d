from __future__ import annotations

from typing import Any

import pytest

from aioredmq import ConfigError, DecodeError
from aioredmq.codecs import JsonCodec, MsgpackCodec, RawCodec, get_codec


@pytest.mark.parametrize("name", ["json", "msgpack"])
@pytest.mark.parametrize("body", [{"a": [1, 2.5, None, "é"]}, [], "text", 0, None])
def test_structured_codecs_round_trip(name: str, body: Any) -> None:
    codec = get_codec(name)
    assert codec.decode(codec.encode(body)) == body


def test_raw_codec_passes_bytes_and_refuses_the_rest() -> None:
    codec = RawCodec()
    assert codec.decode(codec.encode(b"\x00\xff")) == b"\x00\xff"
    assert codec.encode(bytearray(b"ab")) == b"ab"
    with pytest.raises(TypeError, match="raw codec takes bytes"):
        codec.encode("text")


def test_unserialisable_body_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="JSON"):
        JsonCodec().encode({1, 2})
    with pytest.raises(TypeError, match="msgpack"):
        MsgpackCodec().encode(object())


def test_bad_bytes_are_decode_errors() -> None:
    with pytest.raises(DecodeError, match="JSON"):
        JsonCodec().decode(b"{not json")
    with pytest.raises(DecodeError, match="msgpack"):
        MsgpackCodec().decode(b"\xc1")


def test_unknown_codec_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="codec='pickle' is unknown"):
        get_codec("pickle")
    with pytest.raises(ConfigError, match="not a Codec"):
        get_codec(object())  # type: ignore[arg-type]


def test_custom_codec_is_accepted() -> None:
    class Upper:
        name = "upper"

        def encode(self, body: Any) -> bytes:
            return str(body).upper().encode()

        def decode(self, data: bytes) -> Any:
            return data.decode()

    assert get_codec(Upper()).name == "upper"
