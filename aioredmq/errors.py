"""The one exception tree of aioredmq.

Every error the library raises to users derives from :class:`AioredmqError`;
errors from redis-py are translated at the boundary (:func:`translate`)::

    AioredmqError
    ├── ConfigError (ValueError)            a knob has an invalid value; the message names it
    ├── ClosedError                          the client, producer or consumer is closed
    ├── RedisError                           the server or the link to it failed
    │   ├── ConnectionLostError              could not connect, or the link broke mid-command
    │   ├── RedisTimeoutError                the server did not answer within the socket timeout
    │   ├── UnavailableError                 the server refused for now (LOADING, BUSY, READONLY,
    │   │                                    or a cluster slot moving / failing over)
    │   ├── WrongTypeError                   a key holds another Redis type; the message names it
    │   ├── ClusterError                     Redis Cluster refused or could not route a command
    │   └── ResponseError                    any other error reply
    ├── PublishError                         a publish did not complete
    │   ├── MessageTooLargeError (ValueError)  the encoded body is over ``max_body_bytes``
    │   ├── PublishUnconfirmedError          sent, but no confirmation came back: it may exist
    │   └── NotReplicatedError               in Redis, but too few replicas have it yet
    ├── DecodeError                          bytes that are not a valid aioredmq envelope or body
    ├── SlowSubscriberError                  a pub/sub subscriber fell too far behind and was cut off
    └── MessageStateError                    ack/nack on a message that was already settled
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions as rex

__all__ = (
    "AioredmqError",
    "ClosedError",
    "ClusterError",
    "ConfigError",
    "ConnectionLostError",
    "DecodeError",
    "MessageStateError",
    "MessageTooLargeError",
    "PublishError",
    "PublishUnconfirmedError",
    "RedisError",
    "RedisTimeoutError",
    "ResponseError",
    "SlowSubscriberError",
    "TRANSIENT",
    "UnavailableError",
    "WrongTypeError",
    "translate",
)


class AioredmqError(Exception):
    """Root of every error aioredmq raises."""


class ConfigError(AioredmqError, ValueError):
    """A configuration value is invalid. The message names the knob."""


class ClosedError(AioredmqError):
    """The object was closed; it cannot be used or reopened."""


class RedisError(AioredmqError):
    """The Redis server, or the connection to it, failed."""


class ConnectionLostError(RedisError):
    """Could not connect, or the connection broke during a command."""


class RedisTimeoutError(RedisError):
    """The server did not answer within the socket timeout."""


class UnavailableError(RedisError):
    """The server refused for now: loading, busy with a script, a read-only replica after a
    failover, too few replicas, a failed save. The same command may succeed later."""


# Error replies that mean "not now" rather than "never" (the first word of the reply).
_UNAVAILABLE = frozenset(
    ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "NOREPLICAS", "MISCONF", "TRYAGAIN", "CLUSTERDOWN")
)


class WrongTypeError(RedisError):
    """A key holds a value of the wrong Redis type."""


class ClusterError(RedisError):
    """Redis Cluster could not route or refused a command."""


class ResponseError(RedisError):
    """The server answered with an error reply."""


class PublishError(AioredmqError):
    """A publish did not complete."""


class MessageTooLargeError(PublishError, ValueError):
    """The encoded message is larger than the queue's ``max_body_bytes``. Nothing was sent."""


class PublishUnconfirmedError(PublishError):
    """The batch was sent but never confirmed; the messages may or may not exist.

    Retrying the publish may create a duplicate; consumers deduplicate by message id.
    """


class NotReplicatedError(PublishError):
    """Redis has the messages, but fewer replicas than asked acknowledged them in time.

    They may be delivered as usual; a failover before the replicas catch up may lose them.
    ``replicated`` is how many replicas did acknowledge.
    """

    def __init__(self, message: str, replicated: int) -> None:
        super().__init__(message)
        self.replicated = replicated


class DecodeError(AioredmqError):
    """Bytes that are not a valid aioredmq envelope, or a body the codec cannot decode."""


class SlowSubscriberError(AioredmqError):
    """A subscription with ``overflow="disconnect"`` fell ``max_pending`` messages behind."""


class MessageStateError(AioredmqError):
    """The message was already acked, nacked or dead-lettered."""


# Cluster replies (redis-py strips their first word) that nothing ran: the same command
# succeeds once the client has the new slot map, or once the failover is over.
_CLUSTER_IN_MOTION = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)

# What a retry can cure: the link failed, the answer came late, or the server said "not now".
TRANSIENT: tuple[type[AioredmqError], ...] = (ConnectionLostError, RedisTimeoutError, UnavailableError)


def translate(exc: BaseException, *, keys: tuple[str | bytes, ...] = ()) -> AioredmqError:
    """Map a redis-py exception to the aioredmq tree (``keys`` name what the command touched)."""
    where = f" (keys: {', '.join(k if isinstance(k, str) else repr(k) for k in keys)})" if keys else ""
    if isinstance(exc, AioredmqError):
        return exc
    if isinstance(exc, rex.TimeoutError):
        return RedisTimeoutError(f"Redis did not answer in time{where}: {exc}")
    if isinstance(exc, rex.ConnectionError):
        return ConnectionLostError(f"lost the connection to Redis{where}: {exc}")
    if isinstance(exc, _CLUSTER_IN_MOTION):
        return UnavailableError(f"Redis Cluster is moving the slot or failing over{where}: {type(exc).__name__} {exc}")
    text = str(exc)
    if isinstance(exc, rex.ResponseError) and text.split(" ", 1)[0] in _UNAVAILABLE:
        return UnavailableError(f"Redis refused for now{where}: {text}")
    if isinstance(exc, (rex.RedisClusterException, rex.ClusterError)):
        return ClusterError(f"Redis Cluster error{where}: {exc}")
    if "WRONGTYPE" in text:
        return WrongTypeError(
            f"a key holds the wrong Redis type{where}; another application may be using "
            f"this key name: pick another queue name or prefix. Server said: {text}"
        )
    if isinstance(exc, rex.ResponseError):
        return ResponseError(f"Redis error{where}: {text}")
    return RedisError(f"Redis client error{where}: {exc!r}")


@contextlib.contextmanager
def mapped(*keys: str | bytes) -> Iterator[None]:
    """Re-raise redis-py errors raised inside the block as aioredmq errors."""
    try:
        yield
    except (rex.RedisError, rex.RedisClusterException) as exc:  # the latter is no RedisError
        raise translate(exc, keys=keys) from exc
    except (AttributeError, TypeError) as exc:
        if not _closed_under_the_command(exc):
            raise
        where = f" (keys: {', '.join(k if isinstance(k, str) else repr(k) for k in keys)})" if keys else ""
        raise ConnectionLostError(f"the connection was closed while a command used it{where}: {exc!r}") from exc


def _closed_under_the_command(exc: BaseException) -> bool:
    """True for the error redis-py's asyncio connection raises when another task closed
    it between its connected check and its write or read (the stream or transport is
    gone: ``'NoneType' object has no attribute 'writelines'`` and the like). A cluster
    client does that when one command's failure makes it close every node connection
    during a failover; redis-py does not turn it into a ConnectionError (redis-py
    issue 4287). Only errors about a missing object raised inside redis-py or asyncio
    count, so a bug of ours or of a user's codec is never taken for a lost connection."""
    if "'NoneType'" not in str(exc) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/redis/" in path or "/asyncio/" in path
