"""Liveness, readiness and metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response

from app.api.deps import GatewayDep
from app.api.models import HealthReply, ReadyReply, errors
from app.errors import error_response
from app.payloads import json_response
from layers import ChannelError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves requests", response_model=HealthReply)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the channel layer answers",
    description="503 while the layer cannot be reached and once the instance is shutting down.",
    response_model=ReadyReply,
    responses=errors(503),
)
async def readyz(gateway: GatewayDep) -> Response:
    if gateway.draining:  # out of the load balancer before the listener closes
        return error_response(503, "shutting_down", "this instance is shutting down")
    try:
        with anyio.fail_after(2):
            await gateway.channel.ping()
    except TimeoutError:
        return error_response(503, "layer_unavailable", "the layer did not answer within 2 s")
    except ChannelError as exc:
        return error_response(503, exc.code, exc.detail)
    return json_response(
        {
            "status": "ready",
            "layer": gateway.channel.layer.scheme,
            "capabilities": vars(gateway.channel.capabilities),
        }
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Text exposition format. Under gunicorn the values of every worker of the instance are "
        "summed, whichever worker answers."
    ),
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
