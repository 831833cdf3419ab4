"""Request and reply shapes, as documented in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorReply(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What went wrong and what to do")


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Any = Field(description="Any JSON value")
    event: str | None = Field(None, description="Event type; `message` when absent")


class PublishReply(BaseModel):
    channel: str
    id: str = Field(description="Message id assigned by the layer; valid as an SSE id")


class BatchMessage(PublishRequest):
    channel: str


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[BatchMessage]


class BatchReply(BaseModel):
    published: list[PublishReply] = Field(description="One entry per message, in request order")


class Envelope(BaseModel):
    channel: str
    id: str
    event: str
    data: Any
    published_at: str = Field(description="ISO 8601 UTC time the message was published")
    deliveries: int | None = Field(None, description="Group subscriptions only")


class HistoryReply(BaseModel):
    messages: list[Envelope] = Field(description="Retained messages, oldest first")
    gap: bool = Field(description="Messages after `after` are no longer retained")


class AckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(max_length=10_000)


class AckReply(BaseModel):
    acked: int
    unknown: list[str] = Field(description="Ids the group had no pending delivery for")


class ConsumerReply(BaseModel):
    name: str
    pending: int
    idle_seconds: float | None


class GroupReply(BaseModel):
    channel: str
    group: str
    pending: int
    consumers: list[ConsumerReply]
    oldest_unacked: dict[str, Any] | None = Field(
        None, description="`{id, age_seconds}` of the oldest unacknowledged message"
    )


class PerTransport(BaseModel):
    sse: int = Field(description="Server-Sent Events")
    ws: int = Field(description="WebSocket")


class LocalGroup(BaseModel):
    channel: str
    group: str
    consumers: int = Field(description="Consumers of the group connected to this process")


class StatsReply(BaseModel):
    layer: str = Field(description="Scheme of the channel layer in use")
    subscribers: PerTransport = Field(description="Open SSE streams and WebSocket connections")
    published: int = Field(description="Messages published through this process since start")
    delivered: PerTransport = Field(description="Events written to subscribers since start")
    dropped: PerTransport = Field(description="Events dropped by backlog policies since start")
    groups: list[LocalGroup] = Field(
        description="Consumer groups with a consumer connected to this process"
    )


class HealthReply(BaseModel):
    status: str = Field(description="`ok` whenever the process answers")


class ReadyReply(BaseModel):
    status: str = Field(description="`ready`")
    layer: str = Field(description="Scheme of the channel layer in use")
    capabilities: dict[str, bool] = Field(description="`cross_process`, `history`, `groups`")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    meaning = {
        400: "Malformed JSON",
        401: "Missing or invalid token",
        403: "Not allowed",
        404: "Unknown group or route",
        413: "Body too large",
        415: "Unsupported content type",
        422: "Invalid channel name or field",
        501: "The layer lacks this capability",
        503: "Broker unavailable or limit reached; retry (see Retry-After)",
    }
    return {status: {"model": ErrorReply, "description": meaning[status]} for status in statuses}
