"""One error hierarchy for the library; the gateway maps each class to an HTTP status once."""

from __future__ import annotations


class ChannelError(Exception):
    """Base of every error the library raises on purpose."""

    code = "channel_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidArgument(ChannelError):
    """A channel name, pattern, event type, id or option is not acceptable."""

    code = "invalid_argument"


class InvalidPayload(InvalidArgument):
    """The data to publish is not a JSON value."""

    code = "invalid_payload"


class IdempotencyKeyReused(InvalidArgument):
    """An idempotency key still remembered for another message on the same channel."""

    code = "idempotency_key_reused"


class CapabilityNotSupported(ChannelError):
    """The configured layer lacks a capability (history, groups) by design."""

    code = "not_supported"


class UnknownGroup(ChannelError):
    """No consumer group of that name exists on that channel."""

    code = "unknown_group"

    @classmethod
    def named(cls, channel: str, group: str, *, scope: str = "") -> UnknownGroup:
        """The one phrasing; `scope` says where the layer looked (" in this process")."""
        return cls(
            f"no consumer group {group!r} on channel {channel!r}{scope}; "
            "subscribing to the channel with that group creates it"
        )


class LayerUnavailable(ChannelError):
    """The broker cannot be reached right now; retrying later may succeed."""

    code = "layer_unavailable"


class LayerConfigurationError(ChannelError):
    """The layer URL names an unknown scheme or a driver that is not installed."""

    code = "layer_configuration"


class SubscriberOverflow(ChannelError):
    """A subscriber with the `disconnect` backlog policy fell too far behind."""

    code = "subscriber_overflow"


class PublishQueueFull(ChannelError):
    """`Channel.publish_nowait` has `max_queued_publishes` messages waiting already."""

    code = "publish_queue_full"


class ChannelClosed(ChannelError):
    """The `Channel` was closed; no more events will come."""

    code = "channel_closed"
