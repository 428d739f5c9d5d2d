"""The public API is explicit: every name in __all__ exists and is defined where it says."""

from __future__ import annotations

import pkgutil

import aioredmq


def test_all_names_exist_and_are_sorted() -> None:
    assert list(aioredmq.__all__) == sorted(aioredmq.__all__)
    for name in aioredmq.__all__:
        assert hasattr(aioredmq, name), name


def test_exported_members_are_public_objects() -> None:
    public = {n for n in dir(aioredmq) if not n.startswith("_")}
    modules = {m.name for m in pkgutil.iter_modules(aioredmq.__path__)}
    assert public - set(aioredmq.__all__) - modules == set()
    for name in aioredmq.__all__:
        obj = getattr(aioredmq, name)
        assert getattr(obj, "__module__", "").startswith("aioredmq"), name


def test_one_exception_root() -> None:
    for name in aioredmq.__all__:
        obj = getattr(aioredmq, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, aioredmq.AioredmqError), name
