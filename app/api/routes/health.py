"""Liveness, readiness and metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.routes.publish import json_response
from app.errors import error_response
from layers import ChannelError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the channel layer answers",
    responses={503: {"description": "The layer cannot be reached"}},
)
async def readyz(gateway: GatewayDep) -> Response:
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
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(gateway: GatewayDep) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
