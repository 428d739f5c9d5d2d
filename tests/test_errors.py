"""redis-py errors are translated into the one aioredmq tree, with the keys named."""

from __future__ import annotations

import pytest
import redis.exceptions as rex

from aioredmq import errors


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (rex.ConnectionError("reset"), errors.ConnectionLostError),
        (rex.TimeoutError("slow"), errors.RedisTimeoutError),
        (rex.RedisClusterException("no slot"), errors.ClusterError),
        (rex.ClusterDownError("down"), errors.UnavailableError),
        (rex.MovedError("3999 127.0.0.1:7001"), errors.UnavailableError),
        (rex.TryAgainError("Multiple keys request during rehashing"), errors.UnavailableError),
        (rex.ResponseError("WRONGTYPE Operation against a key"), errors.WrongTypeError),
        (rex.ResponseError("NOPERM no permission"), errors.ResponseError),
        (rex.DataError("bad"), errors.RedisError),
    ],
)
def test_translation(raised: Exception, expected: type[errors.AioredmqError]) -> None:
    with pytest.raises(expected, match=r"aioredmq:\{q\}:ready") as info, errors.mapped("aioredmq:{q}:ready"):
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised


def test_errors_of_ours_pass_through_unchanged() -> None:
    ours = errors.ConfigError("x")
    assert errors.translate(ours) is ours


def test_wrong_type_says_what_to_do() -> None:
    err = errors.translate(rex.ResponseError("WRONGTYPE x"), keys=("k",))
    assert "pick another queue name or prefix" in str(err)
