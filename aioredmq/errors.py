"""The one exception tree of aioredmq.

Every error the library raises to users derives from :class:`AioredmqError`;
errors from redis-py are translated at the boundary (:func:`translate`)::

    AioredmqError
    ├── ConfigError (ValueError)            a knob has an invalid value; the message names it
    ├── ClosedError                          the client, producer or consumer is closed
    ├── RedisError                           the server or the link to it failed
    │   ├── ConnectionLostError              could not connect, or the link broke mid-command
    │   │   └── ConnectError                 could not connect: the command was never sent
    │   ├── RedisTimeoutError                the server did not answer within the socket timeout
    │   ├── UnavailableError                 the server refused for now (LOADING, BUSY, READONLY,
    │   │   │                                UNBLOCKED, or a cluster slot moving / failing over)
    │   │   └── OutOfMemoryError (PublishError)  Redis is at ``maxmemory`` and refused a write
    │   ├── WrongTypeError                   a key holds another Redis type; the message names it
    │   ├── ClusterError                     Redis Cluster refused or could not route a command
    │   └── ResponseError                    any other error reply
    ├── PublishError                         a publish did not complete
    │   ├── MessageTooLargeError (ValueError)  the encoded body is over ``max_body_bytes``
    │   ├── PublishUnconfirmedError          sent, but no confirmation came back: it may exist
    │   ├── PublishNotSentError (ConnectError)  never reached Redis: safe to publish again
    │   └── NotReplicatedError               in Redis, but too few replicas have it yet
    ├── DecodeError                          bytes that are not a valid aioredmq envelope or body
    ├── SlowSubscriberError                  a pub/sub subscriber fell too far behind and was cut off
    └── MessageStateError                    ack/nack on a message that was already settled
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import redis.exceptions as rex

__all__ = (
    "AioredmqError",
    "ClosedError",
    "ClusterError",
    "ConfigError",
    "ConnectError",
    "ConnectionLostError",
    "DecodeError",
    "MessageStateError",
    "MessageTooLargeError",
    "OutOfMemoryError",
    "PublishError",
    "PublishNotSentError",
    "PublishUnconfirmedError",
    "RedisError",
    "RedisTimeoutError",
    "ResponseError",
    "SlowSubscriberError",
    "TRANSIENT",
    "UnavailableError",
    "WrongTypeError",
    "permanent",
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


class ConnectError(ConnectionLostError):
    """Could not connect to Redis (refused, unreachable, or no answer within
    ``connect_timeout_s``): the command was never sent."""


class RedisTimeoutError(RedisError):
    """The server did not answer within the socket timeout."""


class UnavailableError(RedisError):
    """The server refused for now: loading, busy with a script, a read-only replica after a
    failover, too few replicas, a failed save. The same command may succeed later."""


# Error replies that mean "not now" rather than "never", by their code (the first word of
# the reply). UNBLOCKED: a blocking read was cut short because the master became a replica
# (or, for a stream, because its key was deleted). redis-py strips the code of some
# replies (``-READONLY ...`` arrives as ReadOnlyError "You can't write against a read only
# replica."), so :func:`translate` also matches their classes.
_UNAVAILABLE = frozenset(
    (
        "LOADING",
        "BUSY",
        "READONLY",
        "MASTERDOWN",
        "NOREPLICAS",
        "MISCONF",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "UNBLOCKED",
        "MOVED",
        "ASK",
    )
)
_UNAVAILABLE_CLASSES = (rex.ReadOnlyError, rex.MasterDownError, rex.BusyLoadingError)
# Codes redis-py strips from the text, by the class it raises instead (older redis-py
# releases keep no ``status_code``).
_STRIPPED = ((rex.ReadOnlyError, "READONLY"), (rex.NoPermissionError, "NOPERM"), (rex.MasterDownError, "MASTERDOWN"))


class WrongTypeError(RedisError):
    """A key holds a value of the wrong Redis type."""


class ClusterError(RedisError):
    """Redis Cluster could not route or refused a command."""


class ResponseError(RedisError):
    """The server answered with an error reply. ``code`` is its first word (``NOPERM``,
    ``NOGROUP``, ``ERR``, ...), or None when it had none."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class PublishError(AioredmqError):
    """A publish did not complete."""


class MessageTooLargeError(PublishError, ValueError):
    """The encoded message is larger than the queue's ``max_body_bytes``. Nothing was sent."""


class PublishUnconfirmedError(PublishError):
    """The batch was sent but never confirmed; the messages may or may not exist.

    Retrying the publish may create a duplicate; consumers deduplicate by message id.
    ``ids`` names the messages (when known: a close that ran out of time lists them all).
    """

    def __init__(self, message: str, ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ids = ids


class PublishNotSentError(PublishError, ConnectError):
    """Every try to send the batch failed to connect: nothing of it reached Redis, so
    publishing again cannot create a duplicate."""


class NotReplicatedError(PublishError):
    """Redis has the messages, but fewer replicas than asked acknowledged them in time.

    They may be delivered as usual; a failover before the replicas catch up may lose them.
    ``replicated`` is how many replicas did acknowledge.
    """

    def __init__(self, message: str, replicated: int) -> None:
        super().__init__(message)
        self.replicated = replicated


class OutOfMemoryError(PublishError, UnavailableError):
    """Redis is over ``maxmemory`` (policy ``noeviction``) and refused a write that would
    grow it. Nothing of the call was written. Consumers go on draining, which frees memory;
    a publish raises this at once rather than waiting, so the caller can shed load."""


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
    if _while_connecting(exc):  # nothing was sent: no keys to name
        return ConnectError(f"could not connect to Redis: {exc}")
    if isinstance(exc, rex.InvalidResponse):
        return ConnectionLostError(
            f"the server does not answer in the Redis protocol (is it Redis, and is this its port?): {exc}"
        )
    if isinstance(exc, rex.TimeoutError):
        return RedisTimeoutError(f"Redis did not answer in time{where}: {exc}")
    if isinstance(exc, rex.ConnectionError):
        return ConnectionLostError(f"lost the connection to Redis{where}: {exc}")
    if isinstance(exc, _CLUSTER_IN_MOTION):
        return UnavailableError(f"Redis Cluster is moving the slot or failing over{where}: {type(exc).__name__} {exc}")
    text = str(exc)
    code = _code(exc, text)
    if code == "OOM":
        return OutOfMemoryError(f"Redis is at maxmemory and refused a write{where}: {text}")
    if isinstance(exc, _UNAVAILABLE_CLASSES) or code in _UNAVAILABLE:
        said = _with_code(code, text)
        return UnavailableError(f"Redis refused for now{where}: {said}")
    if isinstance(exc, (rex.RedisClusterException, rex.ClusterError)):
        return ClusterError(f"Redis Cluster error{where}: {exc}")
    if "WRONGTYPE" in text:
        return WrongTypeError(
            f"a key holds the wrong Redis type{where}; another application may be using "
            f"this key name: pick another queue name or prefix. Server said: {text}"
        )
    if isinstance(exc, rex.ResponseError):
        said = _with_code(code, text)
        return ResponseError(f"Redis error{where}: {said}", code or None)
    return RedisError(f"Redis client error{where}: {exc!r}")


def _while_connecting(exc: BaseException) -> bool:
    """redis-py's errors of a connect that failed before any command went out: the socket's
    own error ("Error 111 connecting to host:port. Connection refused.") or its timeout."""
    if isinstance(exc, rex.TimeoutError):
        return str(exc) == "Timeout connecting to server"
    return isinstance(exc, rex.ConnectionError) and isinstance(exc.__cause__, OSError) and " connecting to " in str(exc)


def _with_code(code: str, text: str) -> str:
    return text if not code or text.startswith(code) else f"{code} {text}"


# Replies that no wait cures: the ACL user lacks a permission, or the server lacks a command.
_NEEDS_AN_OPERATOR = frozenset(("NOPERM", "NOAUTH", "WRONGPASS"))


def permanent(exc: AioredmqError) -> bool:
    """True for errors that retrying cannot cure: a key that holds another Redis type, a
    permission the ACL user lacks, a command the server does not have, a closed object.
    A consumer's loop stops and raises these; it retries every other error, whatever the
    server said, for as long as it takes (a failover, a restart, full memory, lost data)."""
    if isinstance(exc, (WrongTypeError, ConfigError, ClosedError)):
        return True
    if isinstance(exc, ResponseError):
        return exc.code in _NEEDS_AN_OPERATOR or "unknown command" in str(exc)
    return False


_IN_SCRIPT = re.compile(r"@user_script: ?\d+: -?([A-Z]+) ")


def _code(exc: BaseException, text: str) -> str:
    """The error code of a reply: redis-py keeps it apart (``status_code``) for the codes it
    strips; otherwise it is the first word of the text. A script's error reply keeps the
    code of the command that failed inside it."""
    if isinstance(exc, rex.OutOfMemoryError) or text.startswith("OOM command not allowed"):
        return "OOM"
    for cls, known in _STRIPPED:
        if isinstance(exc, cls):
            return known
    inner = _IN_SCRIPT.findall(text)
    if inner:  # Redis 6.2 wraps a script's failed command: "ERR Error running script ...: CODE ..."
        return str(inner[-1])
    code = getattr(exc, "status_code", None)
    if not isinstance(code, str) or not code:
        code = text.split(" ", 1)[0]
    return code if code.isupper() else ""


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
