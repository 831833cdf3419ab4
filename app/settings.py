"""Gateway settings: environment variables with the `GATEWAY_` prefix (or a `.env` file)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from layers.errors import InvalidArgument
from layers.names import validate_pattern

StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    layer: str = Field("memory://", description="Channel layer URL: memory://, redis://, ...")
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    workers: int = Field(1, ge=1, description="Worker processes (needs a cross-process layer)")
    max_payload_bytes: int = Field(1_048_576, ge=1, description="Largest request body (413)")
    max_backlog: int = Field(1000, ge=1, description="Events queued per subscriber")
    max_backlog_bytes: int = Field(
        1_048_576, ge=1, description="Bytes of events (and WebSocket frames) queued per subscriber"
    )
    backlog_policy: Literal["drop_oldest", "drop_newest", "disconnect"] = Field(
        "drop_oldest", description="What a full backlog does"
    )
    send_timeout_seconds: float = Field(
        10.0, gt=0, description="A write to a client stuck this long ends its stream"
    )
    keepalive_seconds: float = Field(15.0, gt=0, description="SSE comment keepalive interval")
    retry_ms: int = Field(3000, ge=0, description="SSE `retry:` reconnection hint")
    history_size: int = Field(1000, ge=0, description="Messages retained per channel")
    history_ttl_seconds: float | None = Field(
        86400.0, gt=0, description="Age after which retained messages expire (empty: never)"
    )
    idempotency_ttl_seconds: float = Field(
        300.0, gt=0, description="How long a publish's idempotency key is remembered"
    )
    ack_timeout_seconds: float = Field(30.0, gt=0, description="Redelivery after this")
    max_deliveries: int = Field(5, ge=1, description="Deliveries before `<channel>.dead`")
    group_prefetch: int = Field(
        10, ge=1, le=1000, description="Unacked messages a group consumer holds, at most"
    )
    presence_ttl_seconds: float = Field(
        30.0, gt=0, description="A dead process's clients leave presence within this"
    )
    channels: StrList = Field(
        default_factory=list, description="Allowed channel globs; empty allows any valid name"
    )
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="Drain time on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the gateway, uvicorn and gunicorn"
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="One JSON object per line, or plain text for a terminal"
    )
    access_log: bool = Field(False, description="Log each request (never bodies) when it ends")
    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans and metrics, for a configured SDK"
    )
    max_connections: int = Field(10_000, ge=1, description="SSE + WebSocket per process (503)")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="A connection's request headers must be in within this (408)"
    )
    max_sockets: int = Field(
        11_000, ge=1, description="Open client sockets per process, of every kind (503 past it)"
    )
    max_channels_per_subscription: int = Field(
        100, ge=1, description="Channels plus patterns in one subscription"
    )
    cors_origins: StrList = Field(default_factory=list, description="Origins allowed by CORS")
    ws_publish_rate: float = Field(
        100.0, gt=0, description="WebSocket publishes per second per connection (burst: 1 s)"
    )
    jwt_secret: SecretStr | None = Field(None, description="HS256 key; turns authorization on")
    jwt_public_key: str | None = Field(
        None, description="RS256 or ES256 public key (PEM); turns authorization on"
    )
    jwt_audience: str | None = Field(None, description="Required `aud` claim")
    jwt_issuer: str | None = Field(None, description="Required `iss` claim")
    jwt_cookie: str = Field("access_token", description="Cookie that may carry the token")
    anonymous_subscribe: bool = Field(
        False, description="With authorization on, subscribing needs no token"
    )

    @field_validator("channels", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Accept a JSON list or comma-separated values."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("channels")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        for glob in value:
            try:
                validate_pattern(glob)
            except InvalidArgument as exc:
                raise ValueError(exc.detail) from None
        return value

    @field_validator("jwt_secret", "jwt_public_key", "jwt_audience", "jwt_issuer", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("jwt_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # RFC 7518 section 3.2: an HS256 key is at least as long as the hash (32 bytes)
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("use at least 32 bytes, e.g. the output of `openssl rand -hex 32`")
        return value

    @field_validator("history_ttl_seconds", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "0", 0) else value

    @model_validator(mode="after")
    def _one_jwt_key(self) -> Settings:
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("set GATEWAY_JWT_SECRET (HS256) or GATEWAY_JWT_PUBLIC_KEY, not both")
        return self

    @model_validator(mode="after")
    def _memory_is_one_process(self) -> Settings:
        if self.workers > 1 and self.layer.startswith("memory:"):
            raise ValueError(
                "memory:// keeps messages inside one process, so GATEWAY_WORKERS > 1 would split "
                "subscribers from publishers; choose a cross-process layer: "
                "redis://, redis+streams://, postgresql://, mqtt:// or nats://"
            )
        return self


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings, or exit naming what to fix (for the command-line entry points)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            (f"GATEWAY_{'.'.join(map(str, error['loc'])).upper()}: " if error["loc"] else "")
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        )
        raise SystemExit(f"invalid gateway settings: {problems}") from None
