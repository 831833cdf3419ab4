"""History and consumer groups of a channel."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.models import (
    AckReply,
    AckRequest,
    ChannelPath,
    ExtendReply,
    GroupPath,
    GroupReply,
    HistoryReply,
    NackReply,
    NackRequest,
    body_schema,
    errors,
)
from app.auth import GrantDep
from app.payloads import json_response, read_json_object

router = APIRouter(tags=["channels"])


@router.get(
    "/channels/{channel}/history",
    summary="Retained messages of a channel, oldest first",
    response_model=HistoryReply,
    responses=errors(401, 403, 422, 501, 503),
)
async def history(
    channel: ChannelPath,
    gateway: GatewayDep,
    grant: GrantDep,
    after: Annotated[str | None, Query(description="Only messages after this id")] = None,
    limit: Annotated[
        int | None,
        Query(ge=1, le=10_000, description="At most this many (the newest without `after`)"),
    ] = None,
) -> Response:
    gateway.check_channel(channel)
    grant.require_subscribe([channel])
    replay = await gateway.channel.history(channel, after=after, limit=limit)
    body = b"".join(
        (
            b'{"messages":[',
            b",".join(event.envelope() for event in replay.events),
            b'],"gap":',
            b"true" if replay.gap else b"false",
            b"}",
        )
    )
    return Response(body, media_type="application/json")


@router.post(
    "/channels/{channel}/groups/{group}/ack",
    summary="Acknowledge group deliveries",
    description="Acks for ids the group has no pending delivery for are reported, not fatal.",
    response_model=AckReply,
    responses=errors(400, 401, 403, 404, 413, 415, 422, 501, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(AckRequest)}},
        }
    },
)
async def ack(
    channel: ChannelPath, group: GroupPath, request: Request, gateway: GatewayDep, grant: GrantDep
) -> Response:
    gateway.check_channel(channel)
    grant.require_group(channel)
    body = AckRequest.read(await read_json_object(request, gateway.settings.max_payload_bytes))
    acked, unknown = await gateway.channel.ack(channel, group, body.ids)
    return json_response({"acked": len(acked), "unknown": unknown})


@router.post(
    "/channels/{channel}/groups/{group}/nack",
    summary="Hand group deliveries back for redelivery",
    description=(
        "Now, or after `delay_seconds`: they go to any consumer of the group with `deliveries` "
        "counted up, and to `<channel>.dead` past the delivery limit, as after a timeout. Their "
        "consumers' prefetch slots are free at once. Ids the group has no pending delivery for "
        "are reported, not fatal."
    ),
    response_model=NackReply,
    responses=errors(400, 401, 403, 404, 413, 415, 422, 501, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(NackRequest)}},
        }
    },
)
async def nack(
    channel: ChannelPath, group: GroupPath, request: Request, gateway: GatewayDep, grant: GrantDep
) -> Response:
    gateway.check_channel(channel)
    grant.require_group(channel)
    body = NackRequest.read(await read_json_object(request, gateway.settings.max_payload_bytes))
    nacked, unknown = await gateway.channel.nack(channel, group, body.ids, delay=body.delay_seconds)
    return json_response({"nacked": len(nacked), "unknown": unknown})


@router.post(
    "/channels/{channel}/groups/{group}/extend",
    summary="Restart the ack timeout of group deliveries still being worked on",
    description="Ids the group has no pending delivery for are reported, not fatal.",
    response_model=ExtendReply,
    responses=errors(400, 401, 403, 404, 413, 415, 422, 501, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(AckRequest)}},
        }
    },
)
async def extend(
    channel: ChannelPath, group: GroupPath, request: Request, gateway: GatewayDep, grant: GrantDep
) -> Response:
    gateway.check_channel(channel)
    grant.require_group(channel)
    body = AckRequest.read(await read_json_object(request, gateway.settings.max_payload_bytes))
    extended, unknown = await gateway.channel.extend(channel, group, body.ids)
    return json_response({"extended": len(extended), "unknown": unknown})


@router.delete(
    "/channels/{channel}/groups/{group}",
    summary="Delete a consumer group",
    description=(
        "The group, its consumers and its pending messages are gone; consumers connected to "
        "it, on any gateway process, get an `unknown_group` error (SSE `event: error`, a "
        "WebSocket error frame) and their subscription ends. Subscribing with the name again "
        "creates a new group."
    ),
    status_code=204,
    response_class=Response,
    responses=errors(401, 403, 404, 422, 501, 503),
)
async def delete_group(
    channel: ChannelPath, group: GroupPath, gateway: GatewayDep, grant: GrantDep
) -> Response:
    gateway.check_channel(channel)
    grant.require_group(channel)
    await gateway.channel.delete_group(channel, group)
    return Response(status_code=204)


@router.get(
    "/channels/{channel}/groups/{group}",
    summary="Consumer group state",
    response_model=GroupReply,
    responses=errors(401, 403, 404, 422, 501, 503),
)
async def group_info(
    channel: ChannelPath, group: GroupPath, gateway: GatewayDep, grant: GrantDep
) -> Response:
    gateway.check_channel(channel)
    grant.require_group(channel)
    info = await gateway.channel.group_info(channel, group)
    oldest = (
        {"id": info.oldest_unacked_id, "age_seconds": info.oldest_unacked_age_seconds}
        if info.oldest_unacked_id is not None
        else None
    )
    return Response(
        orjson.dumps(
            {
                "channel": info.channel,
                "group": info.group,
                "pending": info.pending,
                "consumers": [
                    {
                        "name": c.name,
                        "pending": c.pending,
                        "idle_seconds": c.idle_seconds,
                        "in_flight": c.in_flight if c.in_flight is not None else c.pending,
                        "prefetch": c.prefetch,
                    }
                    for c in info.consumers
                ],
                "oldest_unacked": oldest,
            }
        ),
        media_type="application/json",
    )
