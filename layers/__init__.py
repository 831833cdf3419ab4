"""Pub-sub channels over pluggable layers: in-memory, Redis, PostgreSQL, MQTT.

async with Channel(create_layer("memory://")) as channel:
    await channel.publish("chatroom", {"message": "hello"})
    async with channel.subscribe("chatroom") as subscriber:
        async for event in subscriber:
            ...
"""

from ._broadcast import PatternEvent
from ._idempotency import Replayed
from ._presence import Member, PresenceEvent, new_member
from .base import (
    Capabilities,
    ChannelLayer,
    ChannelObserver,
    ConsumerInfo,
    GroupInfo,
    Replay,
    Sink,
)
from .core import Channel, make_message
from .errors import (
    CapabilityNotSupported,
    ChannelClosed,
    ChannelError,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidPayload,
    LayerConfigurationError,
    LayerUnavailable,
    PublishQueueFull,
    SubscriberOverflow,
    UnknownGroup,
)
from .event import Event, Gap, Message
from .factory import create_layer
from .memory import InMemoryChannelLayer
from .subscription import BacklogPolicy, Item, Subscription

__all__ = [
    "BacklogPolicy",
    "Capabilities",
    "CapabilityNotSupported",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelLayer",
    "ChannelObserver",
    "ConsumerInfo",
    "Event",
    "Gap",
    "GroupInfo",
    "IdempotencyKeyReused",
    "InMemoryChannelLayer",
    "InvalidArgument",
    "InvalidPayload",
    "Item",
    "LayerConfigurationError",
    "LayerUnavailable",
    "Member",
    "Message",
    "PatternEvent",
    "PresenceEvent",
    "PublishQueueFull",
    "Replay",
    "Replayed",
    "Sink",
    "SubscriberOverflow",
    "Subscription",
    "UnknownGroup",
    "create_layer",
    "make_message",
    "new_member",
]
