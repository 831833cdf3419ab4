"""Presence: who is subscribed to a channel, counted over every gateway process on the layer.

The answer comes from this process's replica of every process's subscribers (`layers._presence`),
so it costs no broker round trip. Pattern subscriptions and consumer groups are not counted.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.models import ChannelPath, PresenceReply, errors
from app.auth import GrantDep
from app.payloads import json_response
from layers.event import iso_timestamp

router = APIRouter(tags=["presence"])

MAX_LISTED = 1000  # clients listed in one answer; `subscribers` counts them all


@router.get(
    "/channels/{channel}/presence",
    summary="Who is subscribed to a channel, in every gateway process",
    description=(
        "The channel's subscribers over every gateway process on the layer: their count, and up "
        f"to {MAX_LISTED:,} of them, oldest first (`truncated` when there are more). A client "
        "that disconnects leaves at once; the clients of a process that died within "
        "`GATEWAY_PRESENCE_TTL_SECONDS`. Pattern subscriptions and consumer groups are not "
        "counted. Needs the subscribe right on the channel."
    ),
    response_model=PresenceReply,
    responses=errors(401, 403, 422, 503),
)
async def presence(channel: ChannelPath, gateway: GatewayDep, grant: GrantDep) -> Response:
    gateway.check_channel(channel)
    grant.require_subscribe([channel])
    members = await gateway.channel.presence(channel)
    return json_response(
        {
            "channel": channel,
            "subscribers": len(members),
            "clients": [
                {
                    "client_id": member.client_id,
                    "user": member.user,
                    "transport": member.transport,
                    "connected_at": iso_timestamp(member.connected_at),
                }
                for member in members[:MAX_LISTED]
            ],
            "truncated": len(members) > MAX_LISTED,
        }
    )
