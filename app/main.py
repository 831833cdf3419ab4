"""The application: settings → channel layer (for the app's lifetime) → routes.

`create_app(settings)` is the factory; `app` is the application built from the environment, for
`uvicorn app.main:app`, `fastapi run app/main.py` and `gunicorn -c app/gunicorn_conf.py
app.main:app`. Building it contacts no broker: the layer is created and connected in the lifespan.

`app/` reads top-down from here: `api/routes/*` (one router per concern) → `transports/` (SSE,
WebSocket) → `layers`; what they share sits beside them (`gateway`: the per-process state,
`auth`, `payloads`, `errors`, `metrics`, `timers`), and nothing imports back up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from app import errors
from app.api import document
from app.api.fastpath import PublishFastPath
from app.api.routes import channels, console, events, health, presence, publish, stats, ws
from app.api.stream_path import StreamFastPath
from app.gateway import Gateway
from app.logs import RequestIdMiddleware, install_server_filters
from app.settings import Settings, settings_or_exit
from app.shutdown import drain_on_signal
from layers import Channel, create_layer

logger = logging.getLogger("app")
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class GatewayAPI(FastAPI):
    """FastAPI, with the app's own middlewares outermost, around FastAPI's.

    FastAPI puts its error, telemetry and body-limit middlewares around the app's. Here the app's
    (request ids, CORS, the fast paths of publishing and streaming) go around them instead: a
    publish or a stream answered by a fast path skips three frames it has no use for, and the 500
    of an unexpected error is sent through request ids and CORS, so it carries both. Tracing is
    not in that stack: `FastAPI.__call__` wraps all of it.
    """

    def build_middleware_stack(self) -> ASGIApp:
        own, self.user_middleware = self.user_middleware, []
        try:
            app = super().build_middleware_stack()
        finally:
            self.user_middleware = own
        for cls, args, kwargs in reversed(own):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    gateway = Gateway(settings)
    install_server_filters()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        layer = create_layer(
            settings.layer,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl_seconds,
            idempotency_ttl=settings.idempotency_ttl_seconds,
        )
        async with Channel(
            layer,
            max_backlog=settings.max_backlog,
            backlog_policy=settings.backlog_policy,
            ack_timeout=settings.ack_timeout_seconds,
            presence_ttl=settings.presence_ttl_seconds,
            max_deliveries=settings.max_deliveries,
            prefetch=settings.group_prefetch,
            observer=gateway.metrics,
            max_backlog_bytes=settings.max_backlog_bytes,
        ) as channel:
            gateway.channel = channel
            logger.info("gateway ready on %s", layer.scheme)
            if not gateway.auth.enabled:
                logger.warning(
                    "authorization is off: anyone can publish and subscribe to any channel; "
                    "set GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY before exposing the gateway"
                )
            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(gateway.keepalives.run)
                    tasks.start_soon(gateway.watchdog.run)
                    with drain_on_signal(gateway.drain):
                        yield
                    tasks.cancel_scope.cancel()
            finally:
                gateway.channel = None

    app = GatewayAPI(
        title="Channels gateway",
        summary="Publish over HTTP; subscribe over Server-Sent Events or WebSocket.",
        version="0.1.0",
        lifespan=lifespan,
        # Off, FastAPI still looks for a configured OpenTelemetry SDK on every request (5% of a
        # publish's CPU); on, it traces each request once an SDK is set up.
        telemetry=None if settings.opentelemetry else NO_TELEMETRY,
    )
    app.state.gateway = gateway
    errors.install(app)
    document.install(app)
    app.add_middleware(PublishFastPath, gateway=gateway)  # innermost: after CORS and request ids
    app.add_middleware(StreamFastPath, gateway=gateway)  # beside it: streams skip its frame
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    for module in (publish, events, channels, presence, ws, health, stats, console):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=console.STATIC), name="static")
    app.add_middleware(RequestIdMiddleware)  # outermost: CORS and error replies carry the id too
    return app


app = create_app(settings_or_exit())
