"""The OpenAPI document the app serves at `/openapi.json` (`app.openapi` exports it to a file).

OpenAPI cannot describe a WebSocket, so the `/ws` protocol is written out in the `x-websocket`
extension (frames, with examples) as well as in the document's description.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from layers.event import GapReason

DESCRIPTION = """\
Publish over HTTP; subscribe with Server-Sent Events (`GET /channels/{channel}/events`,
`GET /events`) or a WebSocket (`/ws`, described in `x-websocket` since OpenAPI has no WebSocket).
Errors are always `{"error": "<code>", "detail": "<what to do>"}`.
"""

WEBSOCKET: dict[str, Any] = {
    "path": "/ws",
    "summary": "Subscribe, publish and acknowledge over one WebSocket",
    "description": (
        "JSON text frames. Every client frame may carry a `ref` (any JSON value of at most 256 "
        "bytes), echoed in its reply. A bad frame "
        "gets an `error` frame and the socket stays open. The server closes with 1001 when it "
        "shuts down (reconnect elsewhere), 1008 when the token is refused or expires, 1009 for a "
        "frame over the size limit and 1013 when the subscriber fell too far behind."
    ),
    "authentication": "the same token as HTTP: Authorization header, `access_token` query "
    "parameter or cookie",
    "client_frames": {
        "subscribe": {
            "op": "subscribe",
            "channels": ["chat"],
            "patterns": ["rooms.*"],
            "last_event_id": "optional: resume after this id",
            "group": "optional: join this consumer group (one channel)",
            "consumer": "optional: consumer name in the group",
            "prefetch": "optional: unacked group messages held at most, 1-1000",
            "start": "optional: where a group it creates starts: earliest or after an id",
            "ref": 1,
        },
        "unsubscribe": {"op": "unsubscribe", "channels": ["chat"], "patterns": [], "ref": 2},
        "publish": {
            "op": "publish",
            "channel": "chat",
            "pattern": "instead of channel: a glob, live to every subscriber of a channel it "
            "matches; kept in no history",
            "data": {"text": "hi"},
            "event": "message",
            "idempotency_key": "optional: a retry with the key publishes nothing",
        },
        "ack": {"op": "ack", "channel": "jobs", "group": "workers", "ids": ["<message id>"]},
        "nack": {
            "op": "nack",
            "channel": "jobs",
            "group": "workers",
            "ids": ["<message id>"],
            "delay_seconds": "optional: redeliver after this many seconds (0-3600)",
        },
        "extend": {"op": "extend", "channel": "jobs", "group": "workers", "ids": ["<message id>"]},
    },
    "server_frames": {
        "message": {
            "type": "message",
            "channel": "chat",
            "id": "<message id>",
            "event": "message",
            "data": {"text": "hi"},
            "published_at": "2026-01-01T00:00:00.000Z",
            "deliveries": "group subscriptions only",
            "pattern": "true for a message published to a pattern (`channel` is the pattern)",
        },
        "gap": {"type": "gap", "reason": " | ".join(GapReason)},
        "ok": {
            "type": "ok",
            "ref": 1,
            "op": "subscribe",
            "id": "publish replies only",
            "replayed": "publish replies only, true when the idempotency key was seen",
        },
        "error": {"type": "error", "ref": 1, "error": "<code>", "detail": "...", "status": 422},
    },
}


def install(app: FastAPI) -> None:
    """Serve the document with the WebSocket extension at `/openapi.json`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=DESCRIPTION,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            document["x-websocket"] = WEBSOCKET
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
