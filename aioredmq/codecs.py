"""Body codecs: how a message body becomes bytes and back.

JSON is the default; ``raw`` passes bytes through; ``msgpack`` needs the
``msgpack`` package (``pip install aioredmq[msgpack]``). Pickle is never offered
by default: unpickling a message from Redis runs code chosen by whoever wrote it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError, DecodeError

__all__ = ("Codec", "JsonCodec", "MsgpackCodec", "RawCodec", "get_codec")


@runtime_checkable
class Codec(Protocol):
    """Turns bodies into bytes. ``name`` is written into every envelope (letters only)."""

    name: str

    def encode(self, body: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class JsonCodec:
    name = "json"

    def __init__(self) -> None:
        self._loads = json.JSONDecoder().decode
        # allow_nan=False: NaN and Infinity are not JSON, and other languages' parsers refuse them.
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        self._dumps: Callable[[Any], str] = encoder.encode
        if c_make_encoder is not None:
            # JSONEncoder.encode builds a C encoder on every call; building it once makes
            # encoding about 4x cheaper, and it is most of a publish's client-side cost.
            c_encode = c_make_encoder(
                None,
                encoder.default,
                encode_basestring,
                None,
                encoder.key_separator,
                encoder.item_separator,
                False,
                False,
                False,
            )
            self._dumps = lambda body: "".join(c_encode(body, 0))

    def encode(self, body: Any) -> bytes:
        try:
            return self._dumps(body).encode()
        except (TypeError, ValueError, OverflowError) as exc:
            where = _non_finite(body, "body")
            if where is not None:
                raise TypeError(f"body is not valid JSON: {where}, and JSON has no NaN or Infinity") from exc
            raise TypeError(f"body is not JSON-serialisable: {exc}") from exc
        except RecursionError as exc:  # the cached encoder does not track cycles
            raise TypeError("body is not JSON-serialisable: it is circular or nested too deeply") from exc

    def decode(self, data: bytes) -> Any:
        try:
            # We always write UTF-8: skip json.loads' guessing of the encoding.
            return self._loads(data.decode())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from exc


def _non_finite(value: Any, path: str) -> str | None:
    """Where in ``value`` a NaN or an infinity is (``body["lines"][1]["price"]``), if anywhere."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}"
    if isinstance(value, dict):
        items: Any = ((f"{path}[{k!r}]".replace("'", '"'), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, item in items:
        found = _non_finite(item, where)
        if found is not None:
            return found
    return None


class RawCodec:
    name = "raw"

    def encode(self, body: Any) -> bytes:
        if isinstance(body, bytes):
            return body
        if isinstance(body, (bytearray, memoryview)):
            return bytes(body)
        raise TypeError(f"the raw codec takes bytes, not {type(body).__name__}")

    def decode(self, data: bytes) -> Any:
        return data


class MsgpackCodec:
    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("codec='msgpack' needs the msgpack package: pip install 'aioredmq[msgpack]'") from exc
        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def encode(self, body: Any) -> bytes:
        try:
            return bytes(self._packb(body, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"body is not msgpack-serialisable: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            return self._unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError(f"body is not valid msgpack: {exc}") from exc


_BUILTIN: dict[str, type[Codec]] = {
    "json": JsonCodec,
    "raw": RawCodec,
    "msgpack": MsgpackCodec,
}


def get_codec(codec: str | Codec) -> Codec:
    """Resolve a codec name or instance."""
    if isinstance(codec, str):
        try:
            return _BUILTIN[codec]()
        except KeyError:
            raise ConfigError(f"codec={codec!r} is unknown: use one of {sorted(_BUILTIN)} or a Codec object") from None
    if isinstance(codec, Codec) and isinstance(codec.name, str) and codec.name.isalpha():
        return codec
    raise ConfigError(f"codec={codec!r} is not a Codec: it needs encode(), decode() and an alphabetic name")
