"""Publishing: one message, or a batch in one layer call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.models import (
    BatchMessage,
    BatchReply,
    BatchRequest,
    ChannelPath,
    EventTypeQuery,
    IdempotencyKeyHeader,
    PublishReply,
    PublishRequest,
    body_schema,
    publish_responses,
)
from app.auth import Grant, GrantDep
from app.errors import ApiError, status_of
from app.gateway import Gateway
from app.idempotency import published, replay_headers
from app.payloads import json_response, media_type, read_body, read_json_object
from layers import ChannelError, Message, make_message
from layers.names import validate_event_type

router = APIRouter(tags=["publish"])


@router.post(
    "/channels/{channel}/publish",
    summary="Publish one message",
    description=(
        'Body `{"data": <json>, "event": "<type>"?}` as `application/json`, or the data '
        "itself as a string with `text/plain` (event type from `?event=`). Answers once the layer "
        "accepted the message. With an `Idempotency-Key`, a retry within "
        "`GATEWAY_IDEMPOTENCY_TTL_SECONDS` publishes nothing and answers the first id."
    ),
    response_model=PublishReply,
    responses=publish_responses(400, 401, 403, 413, 415, 422, 501, 503, header=True),
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
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    return await publish_one(request, gateway, grant, channel, event, idempotency_key)


async def publish_one(
    request: Request,
    gateway: Gateway,
    grant: Grant,
    channel: str,
    event: str | None,
    idempotency_key: str | None,
) -> Response:
    """`POST /channels/{channel}/publish`, for this route and for `app.api.fastpath` alike."""
    gateway.check_channel(channel)
    grant.require_publish(channel)
    if event is not None:
        validate_event_type(event)  # even where a JSON body's own `event` wins over it
    limit = gateway.settings.max_payload_bytes
    kind = media_type(request)
    if kind == "text/plain":
        try:
            data: Any = (await read_body(request, limit)).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_text", "a text/plain body must be UTF-8") from None
    else:
        fields = await read_json_object(request, limit, kind)
        if len(fields) == 1 and "data" in fields:  # the usual body: nothing else to check
            data = fields["data"]
        else:
            body = PublishRequest.read(fields)
            data = body.data
            if "event" in body.model_fields_set:  # the body's own `event`, even null, wins
                event = body.event
    message = make_message(channel, data, event, idempotency_key)
    (message_id,) = await gateway.channel.publish_messages([message])
    response = json_response(published(channel, message_id))
    if (headers := replay_headers(message_id)) is not None:
        response.headers.update(headers)
    return response


@router.post(
    "/publish",
    summary="Publish a batch of messages",
    description=(
        "All messages are validated first; then they are published in order, those to channels "
        "in one layer call per run of them. "
        'A message with an `"idempotency_key"` seen before is not published again: its entry '
        'has the first id and `"replayed": true`. '
        "An item with `pattern` instead of `channel` goes live "
        "to every subscriber of a channel the pattern matches, in every gateway process; it is "
        "kept in no history and reaches no consumer group, and needs a publish right covering "
        "every channel the pattern can match."
    ),
    response_model=BatchReply,
    responses=publish_responses(400, 401, 403, 413, 415, 422, 501, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(BatchRequest)}},
        }
    },
)
async def publish_batch(request: Request, gateway: GatewayDep, grant: GrantDep) -> Response:
    body = BatchRequest.read(await read_json_object(request, gateway.settings.max_payload_bytes))
    items: list[Message | BatchMessage] = []
    for index, item in enumerate(body.messages):
        try:
            items.append(_checked(item, gateway, grant))
        except (ApiError, ChannelError) as exc:
            status = exc.status if isinstance(exc, ApiError) else status_of(exc)
            raise ApiError(status, exc.code, f"messages[{index}]: {exc.detail}") from None
    replies: list[dict[str, Any]] = []
    run: list[Message] = []  # channel messages, published together before the next pattern
    for entry in [*items, None]:
        if isinstance(entry, Message):
            run.append(entry)
            continue
        if run:
            ids = await gateway.channel.publish_messages(run)
            replies += [published(m.channel, i) for m, i in zip(run, ids, strict=True)]
            run = []
        if entry is not None and entry.pattern is not None:
            id = await gateway.channel.publish_pattern(entry.pattern, entry.data, event=entry.event)
            replies.append({"pattern": entry.pattern, "id": id})
    return json_response({"published": replies})


def _checked(item: BatchMessage, gateway: Gateway, grant: Grant) -> Message | BatchMessage:
    """A batch item to a channel as the message to publish; one to a pattern, checked."""
    given = {"channel", "pattern"} & item.model_fields_set
    if len(given) != 1 or (item.channel is None and item.pattern is None):
        raise ApiError(422, "invalid_argument", "give either channel or pattern, as a string")
    if item.channel is not None:
        gateway.check_channel(item.channel)
        grant.require_publish(item.channel)
        return make_message(item.channel, item.data, item.event, item.idempotency_key)
    assert item.pattern is not None
    if item.idempotency_key is not None:
        raise ApiError(422, "invalid_argument", "a pattern publish takes no idempotency_key")
    gateway.check_pattern(item.pattern)
    grant.require_publish_pattern(item.pattern)
    if item.event is not None:
        validate_event_type(item.event)
    return item
