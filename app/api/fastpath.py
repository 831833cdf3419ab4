"""`POST /channels/{channel}/publish` answered without FastAPI's router and dependency solving.

A publish is the request the gateway serves most, and a profile of one (py-spy under the S1
benchmark) showed three quarters of its server CPU in FastAPI's routing, dependency solving and
response wrappers, a quarter in the publish itself. This pure ASGI middleware answers that one
route directly, calling what the route calls (`publish_one`, the same `Authenticator.grant_for`)
and replying to an error with the same `response_for`, so nothing a client sees differs. It sits
innermost of the app's own middlewares: request ids, CORS and the 500 of an unexpected error are
theirs, as on every route. The FastAPI route stays, for the OpenAPI document and for any request
this does not take (another method, a path under a mount).
"""

from __future__ import annotations

import re

from starlette._utils import get_route_path
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.routes.publish import publish_one
from app.errors import ApiError, response_for
from app.gateway import Gateway
from app.idempotency import HEADER_NAME
from app.payloads import header
from layers.errors import ChannelError

# The route's path, as Starlette matches `{channel}`: one segment of the decoded path.
PUBLISH_PATH = re.compile(r"/channels/([^/]+)/publish")


class PublishFastPath:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = PUBLISH_PATH.fullmatch(get_route_path(scope))
            if match is not None:
                await self._publish(match[1], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _publish(self, channel: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            grant = self.gateway.auth.grant_for(request)
            event = request.query_params.get("event") if scope["query_string"] else None
            key = header(request, HEADER_NAME)
            response = await publish_one(request, self.gateway, grant, channel, event, key)
        except (ApiError, ChannelError) as exc:
            response = response_for(exc)
        except ClientDisconnect:
            # as `app.errors` does: the client went away mid-body; nobody reads this reply
            response = Response(status_code=400)
        await response(scope, receive, send)
