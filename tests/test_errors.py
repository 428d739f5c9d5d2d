"""redis-py errors are translated into the one aioredmq tree, with the keys named."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
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
        (rex.ReadOnlyError("You can't write against a read only replica."), errors.UnavailableError),
        (rex.ResponseError("UNBLOCKED force unblock from blocking operation"), errors.UnavailableError),
        (rex.MasterDownError("Link with MASTER is down"), errors.UnavailableError),
        (rex.BusyLoadingError("Redis is loading the dataset in memory"), errors.ConnectionLostError),
        (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), errors.OutOfMemoryError),
        (
            rex.ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: x"),
            errors.OutOfMemoryError,
        ),
        # Redis 6.2 wraps the error of a command that failed inside a script:
        (
            rex.ResponseError("Error running script (call to f_a4e9): @user_script:18: NOGROUP No such key 's'"),
            errors.ResponseError,
        ),
        (
            rex.ResponseError("Error running script (call to f_1e34): @user_script:37: -READONLY You can't write"),
            errors.UnavailableError,
        ),
        (
            rex.ResponseError(
                "Error running script (call to f_2cae): @user_script:18: @user_script: 18: -OOM command not"
            ),
            errors.OutOfMemoryError,
        ),
        (rex.DataError("bad"), errors.RedisError),
    ],
)
def test_translation(raised: Exception, expected: type[errors.AioredmqError]) -> None:
    with pytest.raises(expected, match=r"aioredmq:\{q\}:ready") as info, errors.mapped("aioredmq:{q}:ready"):
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised


def test_a_script_error_of_redis_6_2_keeps_the_code_of_the_command_inside() -> None:
    err = errors.translate(rex.ResponseError("Error running script (call to f_a4): @user_script:18: NOGROUP No such"))
    assert isinstance(err, errors.ResponseError)
    assert err.code == "NOGROUP"


def test_only_what_no_wait_cures_is_permanent() -> None:
    assert errors.permanent(errors.translate(rex.ResponseError("WRONGTYPE Operation against a key")))
    assert errors.permanent(
        errors.translate(rex.NoPermissionError("this user has no permissions", status_code="NOPERM"))
    )
    assert errors.permanent(errors.translate(rex.ResponseError("ERR unknown command 'LMPOP'")))
    for cured_by_waiting in (
        rex.ReadOnlyError("You can't write against a read only replica."),
        rex.ResponseError("NOGROUP No such key 's' or consumer group 'g'"),
        rex.ResponseError("MISCONF Errors writing to the AOF file"),
        rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        rex.ResponseError("ERR Error running script: something new"),
    ):
        assert not errors.permanent(errors.translate(cured_by_waiting)), cured_by_waiting


def test_errors_of_ours_pass_through_unchanged() -> None:
    ours = errors.ConfigError("x")
    assert errors.translate(ours) is ours


def test_wrong_type_says_what_to_do() -> None:
    err = errors.translate(rex.ResponseError("WRONGTYPE x"), keys=("k",))
    assert "pick another queue name or prefix" in str(err)


async def test_a_connection_closed_under_a_command_is_a_lost_connection(redis_url: str) -> None:
    """redis-py's asyncio connection raises AttributeError, not ConnectionError, when
    another task closes it between its connected check and its write (a cluster client
    closes every node connection on CLUSTERDOWN). That must read as a lost connection,
    which publishes and consumers retry."""
    conn = aioredis.Connection(**aioredis.from_url(redis_url).connection_pool.connection_kwargs)
    await conn.connect()  # type: ignore[no-untyped-call]

    async def closed_meanwhile() -> None:
        await conn.disconnect(nowait=True)  # what the other task does during this await

    conn.check_health = closed_meanwhile  # type: ignore[method-assign]
    # redis-py 8.2 raises ConnectionError itself ("closed by the server before write").
    with pytest.raises(errors.ConnectionLostError) as info, errors.mapped("aioredmq:{q}:ready"):
        await conn.send_command("PING")
    assert isinstance(info.value.__cause__, AttributeError | TypeError | rex.ConnectionError)


def test_other_attribute_errors_are_not_taken_for_a_lost_connection() -> None:
    with pytest.raises(AttributeError), errors.mapped("k"):
        None.writelines  # type: ignore[attr-defined]  # noqa: B018 - raised here, not inside redis-py
