"""Live numbers for the web console: subscribers, message totals and consumer groups.

Everything here is per process, read from the same Prometheus registry `/metrics` serves, so the
two never disagree. Totals rather than rates: a client polling twice computes any rate it wants,
and a process keeps no clock-dependent state for it. With several workers each answer comes from
whichever worker took the request; `/metrics` scraped per pod is the fleet-wide view.

With authorization on, it needs a token like the channel routes (it names channels and groups),
and lists only the groups on channels whose groups that token may consume.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.models import StatsReply, errors
from app.auth import Grant, GrantDep
from app.errors import ApiError
from app.gateway import Gateway
from app.metrics import TRANSPORTS
from app.payloads import json_response

router = APIRouter(tags=["operations"])


@router.get(
    "/stats",
    summary="Subscribers, message totals and consumer groups of this process",
    description=(
        "Per-process numbers for dashboards such as the web console; poll it and divide the "
        "change in `published` and `delivered` by the time between polls for rates. With "
        "authorization on it needs a token, and `groups` lists only channels whose groups that "
        "token may consume."
    ),
    response_model=StatsReply,
    responses=errors(401, 503),
)
async def stats(gateway: GatewayDep, grant: GrantDep) -> Response:
    groups = gateway.channel.local_groups()  # 503 while starting
    visible = {key: consumers for key, consumers in groups.items() if _may_see(grant, key[0])}
    return json_response(
        {
            "layer": gateway.metrics.layer,
            "subscribers": _per_transport(gateway, "gateway_subscribers_active"),
            "published": _sample(gateway, "gateway_messages_published_total", {}),
            "delivered": _per_transport(gateway, "gateway_messages_delivered_total"),
            "dropped": _per_transport(gateway, "gateway_messages_dropped_total"),
            "groups": [
                {
                    "channel": channel,
                    "group": group,
                    "consumers": len(consumers),
                    "members": [
                        {"name": c.name, "in_flight": c.in_flight, "prefetch": c.prefetch}
                        for c in sorted(consumers, key=lambda c: c.name)
                    ],
                }
                for (channel, group), consumers in sorted(visible.items())
            ],
        }
    )


def _may_see(grant: Grant, channel: str) -> bool:
    try:
        grant.require_group(channel)
    except ApiError:
        return False
    return True


def _per_transport(gateway: Gateway, name: str) -> dict[str, int]:
    return {transport: _sample(gateway, name, {"transport": transport}) for transport in TRANSPORTS}


def _sample(gateway: Gateway, name: str, labels: dict[str, str]) -> int:
    value = gateway.metrics.registry.get_sample_value(
        name, {**labels, "layer": gateway.metrics.layer}
    )
    return int(value or 0)
