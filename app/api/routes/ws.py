"""The WebSocket endpoint."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from app.transports.ws import WebSocketSession

router = APIRouter(tags=["subscribe"])


@router.websocket("/ws")
async def websocket(websocket: WebSocket) -> None:
    """JSON frames: `subscribe`, `unsubscribe`, `publish`, `ack`; see the README."""
    await WebSocketSession(websocket.app.state.gateway, websocket).run()
