"""Subscribing over Server-Sent Events: one channel, or several channels and patterns."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from app.api.deps import GatewayDep
from app.api.models import (
    CHANNEL_RULE,
    GROUP_RULE,
    PATTERN_RULE,
    ChannelPath,
    PresenceChange,
    errors,
)
from app.auth import Grant, GrantDep
from app.errors import ApiError
from app.gateway import Gateway
from app.transports.sse import EventStream
from layers import new_member
from layers.core import MAX_PREFETCH
from layers.event import GapReason

router = APIRouter(tags=["subscribe"])

CHANNEL_ITEM = {"type": "string", **CHANNEL_RULE}
PATTERN_ITEM = {"type": "string", **PATTERN_RULE}

GAP_NOTICE = {
    "type": "object",
    "properties": {
        "reason": {"enum": [reason.value for reason in GapReason]},
        "last_event_id": {"type": "string"},
        "dropped": {"type": "integer", "minimum": 1},
    },
    "required": ["reason"],
}
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {
            "type": "string",
            "description": (
                "The message's type (`message` unless set), `gap`, `join` or `leave` "
                "(`?presence=true`), or `error` (last)"
            ),
        },
        "id": {"type": "string", "description": "Message id; never set on gap or error events"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/Envelope"},
                    PresenceChange.model_json_schema(),
                    GAP_NOTICE,
                    {"$ref": "#/components/schemas/ErrorReply"},
                ]
            },
        },
    },
    "required": ["data"],
}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "A `text/event-stream`. Each message is `id: <id>`, `event: <type>` and "
            "`data: <envelope JSON>`; `event: gap` tells what could not be replayed; comment "
            "lines keep the connection alive."
        ),
        # One event of the stream (how OpenAPI 3.2 and schemathesis read a text/event-stream schema)
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
}

LastEventIdHeader = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="Sent by EventSource on reconnect; wins over the `last_event_id` parameter",
    ),
]
LastEventIdQuery = Annotated[
    str | None,
    Query(description="Resume after this id (a first EventSource connect cannot send headers)"),
]
PresenceQuery = Annotated[
    bool,
    Query(
        description="Also receive `event: join` and `event: leave` of the channels' subscribers, "
        "in every gateway process (no `id:` lines: they are not replayed)"
    ),
]
HistoryQuery = Annotated[
    int | None, Query(ge=0, le=100_000, description="Replay the last N messages on connect")
]


async def open_stream(
    gateway: Gateway,
    grant: Grant,
    channels: list[str],
    patterns: list[str],
    last_event_id: str | None,
    history: int | None,
    group: str | None = None,
    consumer: str | None = None,
    prefetch: int | None = None,
    start: str | None = None,
    presence: bool = False,
) -> EventStream:
    """Open the subscription now, so refusals are JSON errors; the stream owns it afterwards."""
    if consumer is not None and group is None:
        raise ApiError(422, "invalid_argument", "`consumer` names a consumer of a `group`: add one")
    gateway.check_subscription(channels, patterns)
    if group is None:
        grant.require_subscribe(channels, patterns)
    else:
        for channel in channels:
            grant.require_group(channel, consumer)
    connection = gateway.connection()
    connection.__enter__()
    try:
        subscribing = gateway.channel.subscribe(
            *channels,
            patterns=patterns,
            # a group resumes from its own pending list; a reconnecting browser still sends
            # its last id, which must not make the request fail
            last_event_id=None if group else last_event_id,
            history=history,
            group=group,
            consumer=consumer,
            prefetch=prefetch,
            start=start,
            presence=presence,
            member=new_member(grant.subject, "sse"),
        )
        subscription = await subscribing.__aenter__()
    except BaseException:
        connection.__exit__(None, None, None)
        raise
    return EventStream(gateway, subscription, subscribing, connection, grant.deadline())


@router.get(
    "/channels/{channel}/events",
    summary="Subscribe to one channel (SSE)",
    response_class=EventStream,
    status_code=200,  # EventStream's constructor names no default status for FastAPI to find
    responses={**SSE_RESPONSE, **errors(401, 403, 404, 422, 501, 503)},
)
async def channel_events(
    channel: ChannelPath,
    gateway: GatewayDep,
    grant: GrantDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
    history: HistoryQuery = None,
    group: Annotated[
        str | None, Query(description="Join this consumer group", json_schema_extra=GROUP_RULE)
    ] = None,
    consumer: Annotated[
        str | None,
        Query(description="Consumer name within the group", json_schema_extra=GROUP_RULE),
    ] = None,
    prefetch: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_PREFETCH,
            description="Unacked messages this group consumer holds, at most "
            "(default `GATEWAY_GROUP_PREFETCH`)",
        ),
    ] = None,
    start: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="Where a group created by this request starts: `earliest` (the oldest "
            "retained message) or after a message id; new messages without it. 501 on layers "
            "without history.",
        ),
    ] = None,
    presence: PresenceQuery = False,
) -> EventStream:
    return await open_stream(
        gateway,
        grant,
        [channel],
        [],
        last_event_id_header or last_event_id,
        history,
        group,
        consumer,
        prefetch,
        start,
        presence,
    )


@router.get(
    "/events",
    summary="Subscribe to several channels and patterns (SSE)",
    description=(
        "`?channel=a&channel=b&pattern=chat.*`. Ids are ordered across all of them, so one "
        "`Last-Event-ID` resumes every channel and pattern of the stream."
    ),
    response_class=EventStream,
    status_code=200,  # EventStream's constructor names no default status for FastAPI to find
    responses={**SSE_RESPONSE, **errors(401, 403, 422, 501, 503)},
)
async def events(
    gateway: GatewayDep,
    grant: GrantDep,
    channel: Annotated[
        list[str],
        Query(description="Channel names", json_schema_extra={"items": CHANNEL_ITEM}),
    ] = [],  # noqa: B006
    pattern: Annotated[
        list[str],
        Query(description="Glob patterns: `*` and `?`", json_schema_extra={"items": PATTERN_ITEM}),
    ] = [],  # noqa: B006
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
    history: HistoryQuery = None,
    presence: PresenceQuery = False,
) -> EventStream:
    return await open_stream(
        gateway,
        grant,
        channel,
        pattern,
        last_event_id_header or last_event_id,
        history,
        presence=presence,
    )
