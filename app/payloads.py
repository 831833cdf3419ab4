"""JSON request bodies and replies, for the HTTP routes and the WebSocket frames alike.

Errors name what to fix: 400 for malformed JSON, 413 past `GATEWAY_MAX_PAYLOAD_BYTES`, 415 for
another content type, 422 for a JSON value of the wrong shape.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.errors import ApiError


class JSONReply(Response):
    """A 200 reply of JSON bytes, its two headers made directly: `Response.__init__` works out
    on every reply which headers to add and how, and a publish is answered with one of these."""

    media_type = "application/json"

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ]


def json_response(value: Any) -> Response:
    return JSONReply(orjson.dumps(value))


def header(request: Request, name: bytes) -> str | None:
    """One request header (`name` in lower case), read off the ASGI scope: without building
    Starlette's `Headers` and the `KeyError` of its `get` for a header that is absent."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it (413) as soon as it passes `limit` bytes."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    # The ASGI messages themselves, not Starlette's `Request.stream()`: an async generator costs
    # more than the rest of reading a small body. Nothing reads a request's body before this.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: the client went away
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if chunk:
            chunks.append(chunk)
    if len(chunks) == 1:  # a small body comes in one piece: no copy
        return chunks[0]
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body is larger than {limit} bytes (GATEWAY_MAX_PAYLOAD_BYTES)",
    )


def media_type(request: Request) -> str:
    return (header(request, b"content-type") or "").split(";", 1)[0].strip().lower()


async def read_json_object(request: Request, limit: int, kind: str | None = None) -> dict[str, Any]:
    """A JSON object body: 415 for another content type (`kind`, when the caller has it already),
    400 for malformed JSON."""
    kind = media_type(request) if kind is None else kind
    if kind not in ("", "application/json") and not kind.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", f"send application/json, not {kind or 'nothing'}"
        )
    return parse_json_object(await read_body(request, limit))


def parse_json_object(body: bytes | str, what: str = "body") -> dict[str, Any]:
    """A JSON object: 400 for malformed JSON, 422 for another JSON value."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_argument", f"the {what} must be a JSON object")
    return value


def check_fields(body: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = required - body.keys()
    unknown = body.keys() - required - optional
    if missing:
        raise ApiError(422, "invalid_argument", f"missing field(s): {', '.join(sorted(missing))}")
    if unknown:
        raise ApiError(422, "invalid_argument", f"unknown field(s): {', '.join(sorted(unknown))}")
