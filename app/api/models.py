"""Request and reply shapes, as documented in the OpenAPI document.

The request models are what the routes validate bodies with (`RequestBody.read`), so the document
and the checks cannot disagree. Their errors are worded for the API, not by pydantic: "missing
field(s): ...", "messages[2]: ...", and a channel name or event type of the wrong type gets the
message of the layer's own validator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Self

from fastapi import Header, Path, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails

from app.errors import ApiError
from app.idempotency import HEADER, REPLAYED_HEADER
from layers._idempotency import KEY_REGEX, KEY_RULE, MAX_KEY_LENGTH, validate_key
from layers.core import MAX_NACK_DELAY
from layers.errors import InvalidArgument
from layers.names import (
    CHANNEL_REGEX,
    EVENT_TYPE_REGEX,
    MAX_NAME_LENGTH,
    PATTERN_REGEX,
    validate_channel,
    validate_event_type,
    validate_pattern,
)

# The naming rules, stated in the OpenAPI document so clients and fuzzers know them; the
# validators of `layers` (`validate_channel`, `validate_group_name`, ...) stay the one check.
CHANNEL_RULE: dict[str, Any] = {"pattern": CHANNEL_REGEX, "maxLength": MAX_NAME_LENGTH}
PATTERN_RULE: dict[str, Any] = {"pattern": PATTERN_REGEX, "maxLength": MAX_NAME_LENGTH}
EVENT_TYPE_RULE: dict[str, Any] = {"pattern": EVENT_TYPE_REGEX}
GROUP_RULE: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_\-:@.]{1,100}$"}
IDEMPOTENCY_KEY_RULE: dict[str, Any] = {"pattern": KEY_REGEX, "maxLength": MAX_KEY_LENGTH}
MAX_ACK_IDS = 10_000

ChannelPath = Annotated[str, Path(description="Channel name", json_schema_extra=CHANNEL_RULE)]
GroupPath = Annotated[str, Path(description="Consumer group name", json_schema_extra=GROUP_RULE)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description=f"Publish once per key and channel: {KEY_RULE}; a retry with the same key "
        "answers the first id",
        json_schema_extra=IDEMPOTENCY_KEY_RULE,
    ),
]
EventTypeQuery = Annotated[
    str | None,
    Query(description="Event type, for `text/plain` bodies", json_schema_extra=EVENT_TYPE_RULE),
]


class ErrorReply(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What went wrong and what to do")


class RequestBody(BaseModel):
    """A JSON object body; `read` validates one already parsed."""

    model_config = ConfigDict(extra="forbid")
    # what a wrong value of a field must be, by `field` or `field:pydantic error type`
    problems: ClassVar[dict[str, str]] = {}

    @classmethod
    def read(cls, body: dict[str, Any]) -> Self:
        """`body` as this model, or a 422 `invalid_argument` saying what to fix."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, "invalid_argument", _describe(cls, exc.errors())) from None


NAME_CHECKS: dict[str, Callable[[Any], str]] = {
    "channel": validate_channel,
    "pattern": validate_pattern,
    "event": validate_event_type,
    "idempotency_key": validate_key,
}


def _describe(model: type[RequestBody], errors: list[ErrorDetails]) -> str:
    """The first problem, as the API words it: an object's missing or unknown fields before its
    wrong values; a list item's problems prefixed with its place (`messages[2]: `)."""
    top = _fields_problem([e for e in errors if len(e["loc"]) == 1])
    if top is not None:
        return top
    loc = errors[0]["loc"]
    if len(loc) == 3 and isinstance(loc[1], int):  # a field of an object in a list
        prefix = f"{loc[0]}[{loc[1]}]: "
        item = [e for e in errors if e["loc"][:2] == loc[:2]]
        return prefix + (_fields_problem(item) or _value_problem(model, item[0]))
    return _value_problem(model, errors[0])


def _fields_problem(errors: list[ErrorDetails]) -> str | None:
    for kind, words in (("missing", "missing"), ("extra_forbidden", "unknown")):
        names = sorted(str(e["loc"][-1]) for e in errors if e["type"] == kind)
        if names:
            return f"{words} field(s): {', '.join(names)}"
    return None


def _value_problem(model: type[RequestBody], error: ErrorDetails) -> str:
    loc, kind = error["loc"], error["type"]
    name = loc[-1]
    if isinstance(name, str) and name in NAME_CHECKS:
        try:
            NAME_CHECKS[name](error["input"])
        except InvalidArgument as exc:
            return exc.detail
    if kind in ("model_type", "model_attributes_type") and len(loc) == 2:
        return f"{loc[0]}[{loc[1]}] must be an object"
    field = str(loc[0])
    problem = model.problems.get(f"{field}:{kind}") or model.problems.get(field)
    return problem or f"{field}: {error['msg']}"


class PublishRequest(RequestBody):
    data: Any = Field(description="Any JSON value")
    event: str | None = Field(
        None, description="Event type; `message` when absent", json_schema_extra=EVENT_TYPE_RULE
    )


class PublishReply(BaseModel):
    channel: str
    id: str = Field(description="Message id assigned by the layer; valid as an SSE id")
    replayed: bool | None = Field(
        None, description="`true` when an earlier publish with the idempotency key gave this id"
    )


class BatchMessage(PublishRequest):
    """A message to one channel, or (with `pattern` instead) to every channel a pattern matches."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["channel"]}, {"required": ["pattern"]}]}
    )
    channel: str | SkipJsonSchema[None] = Field(None, json_schema_extra=CHANNEL_RULE)
    pattern: str | SkipJsonSchema[None] = Field(
        None,
        description=(
            "Instead of `channel`: a glob pattern; the message goes live to every subscriber of a "
            "channel it matches (or of a pattern within it), in every gateway process. It is kept "
            "in no history, never replayed, and reaches no consumer group."
        ),
        json_schema_extra=PATTERN_RULE,
    )
    idempotency_key: str | None = Field(
        None,
        description=f"Publish once per key and channel: {KEY_RULE}",
        json_schema_extra=IDEMPOTENCY_KEY_RULE,
    )


class BatchRequest(RequestBody):
    problems: ClassVar[dict[str, str]] = {"messages": "messages must be a non-empty list"}
    messages: list[BatchMessage] = Field(min_length=1)


class BatchPublished(BaseModel):
    channel: str | None = Field(None, description="The channel, for a message to a channel")
    pattern: str | None = Field(None, description="The pattern, for a message to a pattern")
    id: str = Field(
        description="Message id; valid as an SSE id (a pattern message's is no resume point)"
    )


class BatchReply(BaseModel):
    published: list[BatchPublished] = Field(description="One entry per message, in request order")


class Envelope(BaseModel):
    channel: str
    id: str
    event: str
    data: Any
    published_at: str = Field(description="ISO 8601 UTC time the message was published")
    deliveries: int | None = Field(None, description="Group subscriptions only")
    pattern: bool | None = Field(
        None, description="True for a message published to a pattern (`channel` is the pattern)"
    )


class PresenceClient(BaseModel):
    client_id: str = Field(description="One SSE stream or WebSocket")
    user: str | None = Field(description="The token's `sub`; null without one")
    transport: str = Field(description="`sse`, `ws` or `library`")
    connected_at: str = Field(description="ISO 8601 UTC time it subscribed to the channel")


class PresenceChange(BaseModel):
    """The data of an SSE `event: join` or `event: leave` (`?presence=true`)."""

    channel: str
    client_id: str
    user: str | None
    transport: str


class PresenceReply(BaseModel):
    channel: str
    subscribers: int = Field(description="Subscribers of the channel in every gateway process")
    clients: list[PresenceClient] = Field(description="Up to 1,000 of them, oldest first")
    truncated: bool = Field(description="More subscribers than `clients` lists")


class HistoryReply(BaseModel):
    messages: list[Envelope] = Field(description="Retained messages, oldest first")
    gap: bool = Field(description="Messages after `after` are no longer retained")


class AckRequest(RequestBody):
    problems: ClassVar[dict[str, str]] = {
        "ids": "ids must be a list of strings",
        "ids:too_long": f"ack at most {MAX_ACK_IDS} ids at once",
    }
    ids: list[str] = Field(max_length=MAX_ACK_IDS)


class AckReply(BaseModel):
    acked: int
    unknown: list[str] = Field(description="Ids the group had no pending delivery for")


class NackRequest(RequestBody):
    problems: ClassVar[dict[str, str]] = {
        **AckRequest.problems,
        "delay_seconds": f"delay_seconds must be a number from 0 to {MAX_NACK_DELAY:g}",
    }
    ids: list[str] = Field(max_length=MAX_ACK_IDS)
    delay_seconds: float = Field(
        0.0,
        ge=0,
        le=MAX_NACK_DELAY,
        description="Redeliver after this many seconds (0: now)",
        json_schema_extra={"examples": [0, 30]},
    )


class NackReply(BaseModel):
    nacked: int
    unknown: list[str] = Field(description="Ids the group had no pending delivery for")


class ExtendReply(BaseModel):
    extended: int
    unknown: list[str] = Field(description="Ids the group had no pending delivery for")


class ConsumerReply(BaseModel):
    name: str
    pending: int = Field(description="Unacked messages the layer counts as this consumer's")
    idle_seconds: float | None
    in_flight: int = Field(
        description="Unacked messages counted against its prefetch (by the process holding it)"
    )
    prefetch: int | None = Field(
        description="Its prefetch; null for a consumer not connected to the answering process"
    )


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


class LocalConsumer(BaseModel):
    name: str
    in_flight: int = Field(description="Unacked messages it holds")
    prefetch: int = Field(description="Unacked messages it may hold, at most")


class LocalGroup(BaseModel):
    channel: str
    group: str
    consumers: int = Field(description="Consumers of the group connected to this process")
    members: list[LocalConsumer] = Field(description="Those consumers, by name")


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
    capabilities: dict[str, bool] = Field(
        description="`cross_process`, `history`, `groups`, `idempotency`"
    )


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


def publish_responses(*statuses: int, header: bool = False) -> dict[int | str, dict[str, Any]]:
    """`errors(*statuses)` as publishing answers them, with idempotency keys; `header`: the 200
    reply may carry `Idempotent-Replayed` (the single publish)."""
    responses = errors(*statuses)
    responses[422] = {
        "model": ErrorReply,
        "description": "Invalid channel name or field; `idempotency_key_reused`: the "
        "idempotency key was used for another message on the channel",
    }
    responses[501] = {
        "model": ErrorReply,
        "description": "An idempotency key on a layer that keeps none across processes (mqtt://)",
    }
    if header:
        responses[200] = {
            "headers": {
                REPLAYED_HEADER: {
                    "description": "`true` when the key was seen: nothing was published and the "
                    "id is the first publish's",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            }
        }
    return responses


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
