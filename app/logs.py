"""Logging: one JSON object per line (python-json-logger), each carrying the request id.

The request id comes from the client's `X-Request-ID` header when it looks like one (so a proxy's
id follows the request through) or is made here, and is sent back in the response. It lives in a
context variable: every record logged while the request runs, by the app or by uvicorn, gets it.

No secret reaches a log line: the value of `access_token` (and of any other parameter named like a
token, password, secret or key) is replaced wherever a URL is logged, by uvicorn or the app.
Nothing logs message payloads: publish and subscribe log nothing per message, and uvicorn's access
log (method, path, status; never bodies) is off unless asked for, since for streams it would only
say when each one ended.
"""

from __future__ import annotations

import logging
import random
import re
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# Set by a stream the gateway ended on purpose before finishing its response (a client that
# stopped reading): uvicorn then reports "returned without completing response", which is no error.
STREAM_CUT: ContextVar[bool] = ContextVar("stream_cut", default=False)
UNFINISHED_RESPONSE = "ASGI callable returned without completing response."
SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access")
HEADER = b"x-request-id"
VALID_ID = re.compile(rb"[A-Za-z0-9._:@-]{1,128}")

JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


# A query parameter that may carry a secret: `access_token` (how EventSource and WebSocket clients
# send their token), and any other `...token`, `password`, `secret` or `key`.
SECRET_PARAMETER = re.compile(
    r"(?<![A-Za-z0-9_])([A-Za-z0-9_]*(?:token|password|secret|key)=)[^&\s\"'#]+", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with the value of every secret-bearing query parameter replaced."""
    return SECRET_PARAMETER.sub(r"\1[redacted]", text) if "=" in text else text


def redact_record(record: logging.LogRecord) -> None:
    """Redact secrets from a record's message and its arguments (URLs in uvicorn's lines)."""
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record, `None` outside a request, and redacts secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.__dict__.pop("color_message", None)  # uvicorn's terminal copy of the message
        redact_record(record)
        return True


class ServerRecordFilter(logging.Filter):
    """On the server's own loggers, whatever configured them (plain `uvicorn` too): redacts
    tokens from the URLs they log (`WebSocket /ws?access_token=...`, the access log), and drops
    the record of a stream the gateway cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == UNFINISHED_RESPONSE and STREAM_CUT.get():
            return False
        redact_record(record)
        return True


def install_server_filters() -> None:
    """Put `ServerRecordFilter` on uvicorn's and gunicorn's loggers (once per process)."""
    for name in SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        if not any(isinstance(f, ServerRecordFilter) for f in server_logger.filters):
            server_logger.addFilter(ServerRecordFilter())


def log_config(level: str, form: str, *, access_log: bool = False) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the app, uvicorn and gunicorn loggers, on stderr."""
    formatter: dict[str, Any] = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FORMAT,
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "timestamp": False,
        }
        if form == "json"
        else {"format": TEXT_FORMAT}
    )
    handler = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": handler,
            "uvicorn.error": handler,
            "uvicorn.access": {**handler, "level": "INFO" if access_log else "WARNING"},
            "gunicorn.error": handler,
            "gunicorn.access": {**handler, "level": "INFO" if access_log else "WARNING"},
        },
    }


def new_request_id() -> str:
    """16 hex digits. An id names a request in the logs and is no secret, so it comes from
    `random` (reseeded in each forked worker), not `os.urandom`: a system call per request cost
    7% of a publish's server CPU."""
    return f"{random.getrandbits(64):016x}"


class RequestIdMiddleware:
    """Sets the request id of each HTTP request and WebSocket, and returns it in a header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next((value for key, value in scope["headers"] if key == HEADER), None)
        request_id = given.decode() if given and VALID_ID.fullmatch(given) else new_request_id()
        # Not reset afterwards: each connection runs in its own task and context, and uvicorn's
        # "Exception in ASGI application" record, logged after the app returns, still gets it.
        REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
