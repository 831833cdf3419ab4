"""`GET /channels/{channel}/events` and `GET /events` served without FastAPI's router.

An SSE stream holds its request for as long as the client stays, and through the FastAPI route
that meant holding everything the route runs under: the request, its dependency results and
FastAPI's exit stacks, the exception middleware and the router's frames. Under 10,000 idle streams
that was most of the gateway's memory per connection (benchmark S3). This pure ASGI middleware
opens the stream itself and runs it with nothing of the request left but what the stream needs.

It does what the route does, with the route's own parts, so nothing a client sees differs: the
same `Authenticator.grant_for`, the route's query, header and path parameters read and checked by
FastAPI's own code from the route's declarations (`request_params_to_args`, the function FastAPI
solves them with), a refusal answered by the app's own handler for validation errors or by
`response_for`, and then the route's endpoint itself, which calls `open_stream`. It sits with
`PublishFastPath`, innermost of the app's own middlewares: request ids, CORS and the 500 of an
unexpected error are theirs, as on every route. The routes stay, for the OpenAPI document and for
any request this does not take (another method, a path with a trailing slash).

Nothing of it stays under a stream: `__call__` is a plain function, and what it returns awaits the
opening and then the stream without a frame of its own (`_Respond`), so an idle stream costs the
frames of the middlewares above and its own, no more.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any

from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.routes import events
from app.errors import ApiError, response_for
from app.gateway import Gateway
from layers.errors import ChannelError

# The routes' paths, as Starlette matches `{channel}`: one segment of the decoded path.
CHANNEL_EVENTS = re.compile(r"/channels/([^/]+)/events")
EVENTS = "/events"

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _route(endpoint: Callable[..., Any]) -> APIRoute:
    (route,) = (
        r for r in events.router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint
    )
    return route


class StreamFastPath:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.channel_events = _route(events.channel_events)
        self.events = _route(events.events)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function: no frame of this middleware stays on the stack under a stream.
        if scope["type"] == "http" and scope["method"] == "GET":
            path = get_route_path(scope)
            if path == EVENTS:
                return _Respond(self._open(self.events, None, scope, receive), scope, receive, send)
            match = CHANNEL_EVENTS.fullmatch(path)
            if match is not None:
                opening = self._open(self.channel_events, match[1], scope, receive)
                return _Respond(opening, scope, receive, send)
        return self.app(scope, receive, send)

    async def _open(
        self, route: APIRoute, channel: str | None, scope: Scope, receive: Receive
    ) -> Response:
        """The route's answer: its stream, or the error reply it would give. The request is
        dropped when this returns: the stream holds only its subscription."""
        request = Request(scope, receive)
        try:
            grant = self.gateway.auth.grant_for(request)
            path = {} if channel is None else {"channel": channel}
            arguments = _parameters(route, request, path)
            stream: Response = await route.endpoint(gateway=self.gateway, grant=grant, **arguments)
            return stream
        except (ApiError, ChannelError) as exc:
            return response_for(exc)
        except RequestValidationError as exc:
            handler: Handler = scope["app"].exception_handlers[RequestValidationError]
            return await handler(request, exc)


def _parameters(route: APIRoute, request: Request, path: Mapping[str, str]) -> dict[str, Any]:
    """The route's path, query, header and cookie parameters of `request`, read and validated as
    FastAPI does for the route (same values, same errors, in the same order)."""
    dependant = route.dependant
    arguments: dict[str, Any] = {}
    errors: list[Any] = []
    for fields, received in (
        (dependant.path_params, path),
        (dependant.query_params, request.query_params),
        (dependant.header_params, request.headers),
        (dependant.cookie_params, request.cookies),
    ):
        values, problems = request_params_to_args(fields, received)
        arguments.update(values)
        errors += problems
    if errors:
        raise RequestValidationError(errors)
    return arguments


class _Respond(Generator[Any, Any, None]):
    """Awaits `opening`, then the response it gives: `await (await opening)(scope, receive,
    send)`, without a coroutine of its own that would stay on the stack, holding the request's
    scope, for as long as the response lasts (a stream: as long as its client stays).

    It drives the awaited coroutines as the task drives it (`send`, `throw`); `close` and
    `__next__` come from `Generator`.
    """

    __slots__ = ("_awaiting", "_receive", "_scope", "_send")

    def __init__(
        self, opening: Coroutine[Any, Any, Response], scope: Scope, receive: Receive, send: Send
    ) -> None:
        self._awaiting: Coroutine[Any, Any, Any] = opening
        self._scope: Scope | None = scope
        self._receive = receive
        self._send = send

    def __await__(self) -> Generator[Any, Any, None]:
        return self

    def send(self, value: Any) -> Any:
        try:
            return self._awaiting.send(value)
        except StopIteration as done:
            return self._respond(done.value)

    def throw(self, *exc_info: Any) -> Any:
        try:
            return self._awaiting.throw(*exc_info)
        except StopIteration as done:
            return self._respond(done.value)

    def close(self) -> None:
        self._awaiting.close()

    def _respond(self, response: Any) -> Any:
        """The opening is done: await its response from here on (`StopIteration` when the
        opening already was the response's end)."""
        scope = self._scope
        if scope is None:  # that was the response: done
            raise StopIteration
        self._scope = None
        self._awaiting = response(scope, self._receive, self._send)
        return self._awaiting.send(None)
