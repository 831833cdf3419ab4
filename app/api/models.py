"""Request and reply shapes, as documented in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

from layers.names import CHANNEL_REGEX, EVENT_TYPE_REGEX, MAX_NAME_LENGTH, PATTERN_REGEX

# The naming rules, stated in the OpenAPI document so clients and fuzzers know them; the
# validators of `layers` (`validate_channel`, `validate_group_name`, ...) stay the one check.
CHANNEL_RULE: dict[str, Any] = {"pattern": CHANNEL_REGEX, "maxLength": MAX_NAME_LENGTH}
PATTERN_RULE: dict[str, Any] = {"pattern": PATTERN_REGEX, "maxLength": MAX_NAME_LENGTH}
EVENT_TYPE_RULE: dict[str, Any] = {"pattern": EVENT_TYPE_REGEX}
GROUP_RULE: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_\-:@.]{1,100}$"}
MAX_ACK_IDS = 10_000

ChannelPath = Annotated[str, Path(description="Channel name", json_schema_extra=CHANNEL_RULE)]
GroupPath = Annotated[str, Path(description="Consumer group name", json_schema_extra=GROUP_RULE)]
EventTypeQuery = Annotated[
    str | None,
    Query(description="Event type, for `text/plain` bodies", json_schema_extra=EVENT_TYPE_RULE),
]


class ErrorReply(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What went wrong and what to do")


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Any = Field(description="Any JSON value")
    event: str | None = Field(
        None, description="Event type; `message` when absent", json_schema_extra=EVENT_TYPE_RULE
    )


class PublishReply(BaseModel):
    channel: str
    id: str = Field(description="Message id assigned by the layer; valid as an SSE id")


class BatchMessage(PublishRequest):
    channel: str = Field(json_schema_extra=CHANNEL_RULE)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[BatchMessage] = Field(min_length=1)


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
    ids: list[str] = Field(max_length=MAX_ACK_IDS)


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


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined, for `openapi_extra` request bodies: the
    document resolves a `$ref` from its own root, where pydantic's `#/$defs/...` do not exist."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if str(node.get("$ref", "")).startswith("#/$defs/"):
                return inline(definitions[node["$ref"].removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


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
