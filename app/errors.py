"""Every error the gateway answers with, mapped to HTTP statuses and WebSocket close codes here.

Bodies are always `{"error": "<code>", "detail": "<what to do>"}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from layers.errors import (
    CapabilityNotSupported,
    ChannelClosed,
    ChannelError,
    InvalidArgument,
    LayerUnavailable,
    SubscriberOverflow,
    UnknownGroup,
)


class ApiError(Exception):
    """An error of the HTTP surface itself (bad body, wrong content type, auth, limits)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


# ChannelError class -> (HTTP status, WebSocket close code)
_STATUS: dict[type[ChannelError], tuple[int, int]] = {
    InvalidArgument: (422, 1008),
    CapabilityNotSupported: (501, 1003),
    UnknownGroup: (404, 1008),
    LayerUnavailable: (503, 1013),
    ChannelClosed: (503, 1001),
    SubscriberOverflow: (503, 1013),
}
RETRY_AFTER_SECONDS = "1"


def status_of(exc: ChannelError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls][0]
    return 500


def close_code_of(exc: ChannelError | ApiError) -> int:
    if isinstance(exc, ApiError):
        return {401: 1008, 403: 1008, 413: 1009, 503: 1013}.get(exc.status, 1008)
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls][1]
    return 1011


def error_body(code: str, detail: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": code, "detail": detail, **extra})


def error_response(status: int, code: str, detail: str) -> Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return Response(
        error_body(code, detail), status_code=status, media_type="application/json", headers=headers
    )


def response_for(exc: ChannelError | ApiError) -> Response:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.detail)
    return error_response(status_of(exc), exc.code, exc.detail)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON error body."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError | ChannelError)
        return response_for(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return error_response(422, "invalid_argument", problems)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = {
            404: f"no route {request.url.path}; see /docs for the API",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        response = error_response(exc.status_code, codes.get(exc.status_code, "http_error"), detail)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:  # one path, several routes (a group's GET and DELETE): all
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client went away mid-request (a body cut short): not an error, nothing to log,
        # and no one to answer; the server drops this reply.
        return Response(status_code=400)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(ChannelError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)


def _allowed(request: Request) -> list[str]:
    """The methods of every route matching the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(request.url.path):
            methods |= route.methods or set()
    return sorted(methods)
