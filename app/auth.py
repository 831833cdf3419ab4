"""Authorization: JSON Web Tokens that grant channel globs to publish and subscribe to.

Design decisions, so nobody "fixes" them:

- Off unless a key is configured (`GATEWAY_JWT_SECRET` for HS256, `GATEWAY_JWT_PUBLIC_KEY` for
  RS256/ES256); then every publish, subscribe, history read, ack and group read needs a grant.
  The accepted algorithm follows from the key alone, never from the token's header, so `alg: none`
  and HS256-signed-with-the-public-key tokens are refused.
- `exp` is required: a token a browser holds must stop working by itself. Open streams end at
  that instant (the SSE and WebSocket transports take `Grant.deadline`).
- The token comes from `Authorization: Bearer`, the `access_token` query parameter (`EventSource`
  cannot set headers) or a cookie. A browser attaches cookies to requests any site makes, so a
  token read from a cookie is honoured only when the request's `Origin` is absent, the gateway's own
  host, or one of `GATEWAY_CORS_ORIGINS`: cross-site forms cannot publish and cross-site WebSocket
  handshakes (which CORS does not cover) cannot ride a user's cookie.
- Consumer groups are a right of their own (`channels.groups`): joining a channel's groups,
  acking, reading group state, and reading its dead letters (`<channel>.dead`). A consumer name is
  the token's `sub` or starts with `<sub>:`, so one user cannot join as another's consumer and take
  its pending messages; `channels.any_consumer: true` (a backend's worker pool) lifts that. A
  consumer left unnamed gets a generated name, which is never another's. Acks are per group, not
  per consumer: whoever may consume a group may ack its messages.
- A subscription pattern is allowed only if one granted glob covers every channel it can match
  (`pattern_within`). That is sound but conservative: a pattern covered only by the union of several
  globs (`a*` by `a` and `a?*`) is refused; grant a wider glob or subscribe to narrower patterns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import Depends
from starlette.requests import HTTPConnection

from app.errors import ApiError
from app.settings import Settings
from layers.errors import InvalidArgument
from layers.names import DEAD_LETTER_SUFFIX, compile_pattern, pattern_within, validate_pattern

logger = logging.getLogger("app.auth")

TOKEN_QUERY_PARAMETER = "access_token"
HOW_TO_SEND = (
    "send a JWT as `Authorization: Bearer <token>`, the `access_token` query parameter "
    "or the cookie named by GATEWAY_JWT_COOKIE"
)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one request or connection may do: channel globs, and until when."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    groups: tuple[str, ...] = ()  # channels whose consumer groups it may consume
    subject: str | None = None  # `sub`: consumer names start with it
    any_consumer: bool = False  # may use any consumer name
    expires_at: float | None = None  # epoch seconds (`exp`)
    anonymous: bool = False  # no token was sent: refusals are 401, not 403

    def deadline(self) -> float:
        """`expires_at` on the anyio clock (what cancel scopes take); infinite without one."""
        if self.expires_at is None:
            return math.inf
        return anyio.current_time() + (self.expires_at - time.time())

    def require_publish(self, channel: str) -> None:
        if not _covered(channel, self.publish):
            raise self._refusal(f"publishing to {channel!r}")

    def require_publish_pattern(self, pattern: str) -> None:
        if "*" not in self.publish and not any(
            pattern_within(pattern, glob) for glob in self.publish
        ):
            raise self._refusal(
                f"publishing to pattern {pattern!r}: one granted glob must cover every channel "
                "it can match"
            )

    def require_subscribe(self, channels: Sequence[str], patterns: Sequence[str] = ()) -> None:
        for name in channels:
            if not _covered(name, self.subscribe) and not self._dead_letters_of_own_group(name):
                raise self._refusal(f"subscribing to {name!r}")
        for pattern in patterns:
            if "*" not in self.subscribe and not any(
                pattern_within(pattern, glob) for glob in self.subscribe
            ):
                raise self._refusal(
                    f"subscribing to pattern {pattern!r}: one granted glob must cover every "
                    "channel it can match"
                )

    def require_group(self, channel: str, consumer: str | None = None) -> None:
        """May consume `channel`'s groups, as `consumer` (None: a generated name)."""
        if not _covered(channel, self.groups):
            raise self._refusal(f"consuming the groups of {channel!r} (claim `channels.groups`)")
        if consumer is None or self.any_consumer:
            return
        if self.subject is None:
            raise self._refusal(
                f"the consumer name {consumer!r}: a token without `sub` may only use generated "
                "names (leave `consumer` out) unless it has `channels.any_consumer`"
            )
        if consumer != self.subject and not consumer.startswith(self.subject + ":"):
            raise self._refusal(
                f"the consumer name {consumer!r}: use {self.subject!r} or "
                f"'{self.subject}:<name>' (the token's `sub`)"
            )

    def _dead_letters_of_own_group(self, channel: str) -> bool:
        """`<c>.dead` is readable by whoever may consume `c`'s groups."""
        base = channel.removesuffix(DEAD_LETTER_SUFFIX)
        return base != channel and _covered(base, self.groups)

    def _refusal(self, what: str) -> ApiError:
        if self.anonymous:
            return ApiError(401, "token_required", f"{what} needs a token: {HOW_TO_SEND}")
        return ApiError(403, "forbidden", f"the token does not allow {what}")


EVERYTHING = Grant(publish=("*",), subscribe=("*",), groups=("*",), any_consumer=True)


def _covered(channel: str, globs: tuple[str, ...]) -> bool:
    return "*" in globs or any(compile_pattern(glob)(channel) for glob in globs)


class Authenticator:
    """Turns the token of a request or WebSocket handshake into a `Grant`."""

    def __init__(self, settings: Settings) -> None:
        self.cookie = settings.jwt_cookie
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.anonymous = (
            Grant(publish=(), subscribe=("*",), anonymous=True)
            if settings.anonymous_subscribe
            else None
        )
        self.origins = set(settings.cors_origins)
        self.key: Any = None
        self.algorithms: list[str] = []
        if settings.jwt_secret is not None:
            self.key, self.algorithms = settings.jwt_secret.get_secret_value().encode(), ["HS256"]
        elif settings.jwt_public_key is not None:
            self.key, self.algorithms = load_public_key(settings.jwt_public_key)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def grant_for(self, connection: HTTPConnection) -> Grant:
        """The grant of a request or handshake: 401 for a missing, invalid or expired token."""
        if not self.enabled:
            return EVERYTHING
        token = self._token(connection)
        if token is None:
            if self.anonymous is None:
                raise ApiError(401, "token_required", f"a token is required: {HOW_TO_SEND}")
            return self.anonymous
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "token_expired", "the token has expired; get a new one") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, "invalid_token", f"the token was refused: {exc}") from None
        return _grant_of(claims)

    def _token(self, connection: HTTPConnection) -> str | None:
        scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        if token := connection.query_params.get(TOKEN_QUERY_PARAMETER):
            return token
        if (token := connection.cookies.get(self.cookie)) and self._trusted_origin(connection):
            return token
        return None

    def _trusted_origin(self, connection: HTTPConnection) -> bool:
        origin = connection.headers.get("origin")
        return (
            origin is None
            or origin in self.origins
            or urlsplit(origin).netloc == connection.headers.get("host")
        )


def _grant_of(claims: dict[str, Any]) -> Grant:
    channels = claims.get("channels", {})
    if not isinstance(channels, dict):
        raise ApiError(401, "invalid_token", "the `channels` claim must be an object")
    rights = []
    for right in ("publish", "subscribe", "groups"):
        globs = channels.get(right, [])
        if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
            raise ApiError(401, "invalid_token", f"`channels.{right}` must be a list of globs")
        try:
            rights.append(tuple(validate_pattern(g) for g in globs))
        except InvalidArgument as exc:
            raise ApiError(401, "invalid_token", f"`channels.{right}`: {exc.detail}") from None
    subject = claims.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise ApiError(401, "invalid_token", "the `sub` claim must be a string")
    any_consumer = channels.get("any_consumer", False)
    if not isinstance(any_consumer, bool):
        raise ApiError(401, "invalid_token", "`channels.any_consumer` must be true or false")
    return Grant(
        publish=rights[0],
        subscribe=rights[1],
        groups=rights[2],
        subject=subject,
        any_consumer=any_consumer,
        expires_at=float(claims["exp"]),
    )


def load_public_key(pem: str) -> tuple[Any, list[str]]:
    """The verification key and the one algorithm it serves: RS256 for RSA, ES256 for P-256."""
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError(f"GATEWAY_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, ["ES256"]
    raise ValueError(
        "GATEWAY_JWT_PUBLIC_KEY must be an RSA key of at least 2048 bits (RS256) "
        "or a P-256 EC key (ES256)"
    )


async def get_grant(connection: HTTPConnection) -> Grant:
    """FastAPI dependency: the grant of the request (401 for a bad token)."""
    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request
    authenticator: Authenticator = connection.app.state.gateway.auth
    return authenticator.grant_for(connection)


GrantDep = Annotated[Grant, Depends(get_grant)]
