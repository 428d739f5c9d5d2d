"""aioredmq: reliable, fast asyncio messaging on Redis."""

from .channel import Broadcast as Broadcast
from .channel import Channel as Channel
from .channel import Subscription as Subscription
from .channel import SubscriptionStats as SubscriptionStats
from .client import Client as Client
from .client import Sentinels as Sentinels
from .client import connect as connect
from .codecs import Codec as Codec
from .codecs import JsonCodec as JsonCodec
from .codecs import MsgpackCodec as MsgpackCodec
from .codecs import RawCodec as RawCodec
from .config import RetryPolicy as RetryPolicy
from .consumer import Consumer as Consumer
from .consumer import ConsumerStats as ConsumerStats
from .envelope import DeadRecord as DeadRecord
from .errors import AioredmqError as AioredmqError
from .errors import ClosedError as ClosedError
from .errors import ClusterError as ClusterError
from .errors import ConfigError as ConfigError
from .errors import ConnectError as ConnectError
from .errors import ConnectionLostError as ConnectionLostError
from .errors import DecodeError as DecodeError
from .errors import MessageStateError as MessageStateError
from .errors import MessageTooLargeError as MessageTooLargeError
from .errors import NotReplicatedError as NotReplicatedError
from .errors import OutOfMemoryError as OutOfMemoryError
from .errors import PublishError as PublishError
from .errors import PublishNotSentError as PublishNotSentError
from .errors import PublishUnconfirmedError as PublishUnconfirmedError
from .errors import RedisError as RedisError
from .errors import RedisTimeoutError as RedisTimeoutError
from .errors import ResponseError as ResponseError
from .errors import SlowSubscriberError as SlowSubscriberError
from .errors import UnavailableError as UnavailableError
from .errors import WrongTypeError as WrongTypeError
from .idempotency import Idempotency as Idempotency
from .message import Message as Message
from .partitioned import PartitionedConsumer as PartitionedConsumer
from .partitioned import PartitionedQueue as PartitionedQueue
from .partitioned import PartitionedStats as PartitionedStats
from .queue import Queue as Queue
from .queue import QueueStats as QueueStats
from .runner import run as run
from .service import RunnerHealth as RunnerHealth
from .service import Service as Service
from .service import ServiceHealth as ServiceHealth
from .stream import ConsumerInfo as ConsumerInfo
from .stream import GroupStats as GroupStats
from .stream import Stream as Stream
from .stream import StreamStats as StreamStats
from .stream_consumer import StreamConsumer as StreamConsumer

__version__ = "0.1.0"

__all__ = (
    "AioredmqError",
    "Broadcast",
    "Channel",
    "Client",
    "ClosedError",
    "ClusterError",
    "Codec",
    "ConfigError",
    "ConnectError",
    "ConnectionLostError",
    "Consumer",
    "ConsumerInfo",
    "ConsumerStats",
    "DeadRecord",
    "DecodeError",
    "GroupStats",
    "Idempotency",
    "JsonCodec",
    "Message",
    "MessageStateError",
    "MessageTooLargeError",
    "MsgpackCodec",
    "NotReplicatedError",
    "OutOfMemoryError",
    "PartitionedConsumer",
    "PartitionedQueue",
    "PartitionedStats",
    "PublishError",
    "PublishNotSentError",
    "PublishUnconfirmedError",
    "Queue",
    "QueueStats",
    "RawCodec",
    "RedisError",
    "RedisTimeoutError",
    "ResponseError",
    "RetryPolicy",
    "RunnerHealth",
    "Sentinels",
    "Service",
    "ServiceHealth",
    "SlowSubscriberError",
    "Stream",
    "StreamConsumer",
    "StreamStats",
    "Subscription",
    "SubscriptionStats",
    "UnavailableError",
    "WrongTypeError",
    "connect",
    "run",
)
