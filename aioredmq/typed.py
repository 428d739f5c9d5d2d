"""Typed bodies: a queue or stream declared with ``body=Model`` publishes only that type
and validates what it reads, so ``msg.body`` is a ``Model`` for mypy and at run time.

A dataclass, a pydantic model or a msgspec Struct; the wire format is the codec's own
(JSON by default), so typed and untyped clients of the same queue interoperate. A body
that does not validate is refused at publish (TypeError), and one that arrives anyway
(a foreign writer) is undecodable: it goes to dead-letter with the validation error.
Dataclasses are validated field by field with msgspec or pydantic when one is
installed, and otherwise only by their constructor (missing or unknown fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .codecs import Codec
from .errors import ConfigError, DecodeError

__all__ = ("TypedCodec", "typed_codec")

T = TypeVar("T")


def _msgspec() -> Any:
    try:
        import msgspec
    except ImportError:
        return None
    return msgspec


def _pydantic() -> Any:
    try:
        import pydantic
    except ImportError:
        return None
    return pydantic


class TypedCodec(Generic[T]):
    """``inner`` with a body type: encodes only ``body`` instances, decodes into them."""

    def __init__(self, inner: Codec, body: type[T]) -> None:
        self.inner = inner
        self.name = inner.name
        self.body = body
        self._to_builtins, self._validate = _converters(body)

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.body):
            raise TypeError(f"this queue's bodies are {self.body.__name__}, not {type(value).__name__}")
        plain = self._to_builtins(value)
        try:
            # What a consumer will do with it: a body that would not decode never leaves.
            self._validate(plain)
        except Exception as exc:  # each library raises its own validation error
            raise TypeError(f"body does not match {self.body.__name__}, nothing was sent: {exc}") from exc
        return self.inner.encode(plain)

    def decode(self, data: bytes) -> T:
        raw = self.inner.decode(data)
        try:
            return self._validate(raw)
        except Exception as exc:  # each library raises its own validation error
            raise DecodeError(f"body does not match {self.body.__name__}: {exc}") from exc


def _converters(body: type[T]) -> tuple[Callable[[T], Any], Callable[[Any], T]]:
    msgspec, pydantic = _msgspec(), _pydantic()
    if pydantic is not None and isinstance(body, type) and issubclass(body, pydantic.BaseModel):
        model: Any = body
        return (lambda v: model.model_dump(v, mode="json")), model.model_validate
    if msgspec is not None and isinstance(body, type) and issubclass(body, msgspec.Struct):
        return msgspec.to_builtins, (lambda raw: msgspec.convert(raw, body))
    if dataclasses.is_dataclass(body) and isinstance(body, type):
        if msgspec is not None:
            return msgspec.to_builtins, (lambda raw: msgspec.convert(raw, body))
        if pydantic is not None:
            adapter = pydantic.TypeAdapter(body)
            return (lambda v: adapter.dump_python(v, mode="json")), adapter.validate_python

        def construct(raw: Any) -> T:
            if not isinstance(raw, dict):
                raise TypeError(f"expected an object, got {type(raw).__name__}")
            return body(**raw)

        return (lambda v: dataclasses.asdict(v)), construct
    raise ConfigError(f"body={body!r} must be a dataclass, a pydantic model or a msgspec Struct")


def typed_codec(inner: Codec, body: type[T] | None) -> Codec:
    return inner if body is None else TypedCodec(inner, body)
