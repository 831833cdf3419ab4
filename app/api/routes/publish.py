"""Publishing: one message, or a batch in one layer call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.models import (
    BatchReply,
    BatchRequest,
    ChannelPath,
    EventTypeQuery,
    PublishReply,
    PublishRequest,
    body_schema,
    errors,
)
from app.auth import Grant, GrantDep
from app.errors import ApiError, status_of
from app.gateway import Gateway
from app.payloads import json_response, media_type, read_body, read_json_object
from layers import ChannelError, make_message
from layers.names import validate_event_type

router = APIRouter(tags=["publish"])


@router.post(
    "/channels/{channel}/publish",
    summary="Publish one message",
    description=(
        'Body `{"data": <json>, "event": "<type>"?}` as `application/json`, or the data '
        "itself as a string with `text/plain` (event type from `?event=`). Answers once the layer "
        "accepted the message."
    ),
    response_model=PublishReply,
    responses=errors(400, 401, 403, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body_schema(PublishRequest)},
                "text/plain": {"schema": {"type": "string"}},
            },
        }
    },
)
async def publish(
    channel: ChannelPath,
    request: Request,
    gateway: GatewayDep,
    grant: GrantDep,
    event: EventTypeQuery = None,
) -> Response:
    return await publish_one(request, gateway, grant, channel, event)


async def publish_one(
    request: Request, gateway: Gateway, grant: Grant, channel: str, event: str | None
) -> Response:
    """`POST /channels/{channel}/publish`, for this route and for `app.api.fastpath` alike."""
    gateway.check_channel(channel)
    grant.require_publish(channel)
    if event is not None:
        validate_event_type(event)  # even where a JSON body's own `event` wins over it
    limit = gateway.settings.max_payload_bytes
    if media_type(request) == "text/plain":
        try:
            data: Any = (await read_body(request, limit)).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_text", "a text/plain body must be UTF-8") from None
    else:
        body = PublishRequest.read(await read_json_object(request, limit))
        data = body.data
        if "event" in body.model_fields_set:  # the body's own `event`, even null, wins
            event = body.event
    (message_id,) = await gateway.channel.publish_messages([make_message(channel, data, event)])
    return json_response({"channel": channel, "id": message_id})


@router.post(
    "/publish",
    summary="Publish a batch of messages",
    description="All messages are validated first; then they are published in order, in one call.",
    response_model=BatchReply,
    responses=errors(400, 401, 403, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(BatchRequest)}},
        }
    },
)
async def publish_batch(request: Request, gateway: GatewayDep, grant: GrantDep) -> Response:
    body = BatchRequest.read(await read_json_object(request, gateway.settings.max_payload_bytes))
    messages = []
    for index, item in enumerate(body.messages):
        try:
            gateway.check_channel(item.channel)
            grant.require_publish(item.channel)
            messages.append(make_message(item.channel, item.data, item.event))
        except (ApiError, ChannelError) as exc:
            status = exc.status if isinstance(exc, ApiError) else status_of(exc)
            raise ApiError(status, exc.code, f"messages[{index}]: {exc.detail}") from None
    ids = await gateway.channel.publish_messages(messages)
    return json_response(
        {"published": [{"channel": m.channel, "id": i} for m, i in zip(messages, ids, strict=True)]}
    )
