"""Idempotent publish over the API: the `Idempotency-Key` header and how a reply tells a replay.

The keys themselves are the layer's (`layers._idempotency`): any route that publishes passes the
key into `make_message` and answers with `published` (and `replay_headers` over HTTP).
"""

from __future__ import annotations

from typing import Any

from layers import Replayed

HEADER = "Idempotency-Key"
HEADER_NAME = HEADER.lower().encode()  # as the ASGI scope has it
REPLAYED_HEADER = "Idempotent-Replayed"


def published(channel: str, id: str) -> dict[str, Any]:
    """A publish reply: `{"channel", "id"}`, with `"replayed": true` when the key was seen."""
    if isinstance(id, Replayed):
        return {"channel": channel, "id": id, "replayed": True}
    return {"channel": channel, "id": id}


def replay_headers(id: str) -> dict[str, str] | None:
    """`Idempotent-Replayed: true` for an id answered from an earlier publish with the key."""
    return {REPLAYED_HEADER: "true"} if isinstance(id, Replayed) else None
