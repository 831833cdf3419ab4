"""Plumbing of the NATS layer: its URL and options, ids, errors and the messages it writes."""

from __future__ import annotations

import asyncio
import logging
import re
from abc import abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType

from .base import ChannelLayer
from .errors import LayerConfigurationError
from .event import Event
from .urls import split_options

logger = logging.getLogger("layers.nats")

URL_OPTIONS = {
    "stream": "GATEWAY",
    "subject_prefix": "gw",
    "replicas": "1",
    "storage": "file",
    "connect_timeout": "5",
    "publish_timeout": "5",
    "randomize": "true",
    "max_bytes": "-1",
}
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PREFIX = re.compile(r"[A-Za-z0-9_\-:@]+(?:\.[A-Za-z0-9_\-:@]+)*")

REQUEST_TIMEOUT = 2.0  # one JetStream API request

# What "the server cannot be reached right now" looks like through nats-py.
UNAVAILABLE: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class NatsOptions:
    """What a `nats://` URL says: the servers of the seed list and the layer's options."""

    servers: list[str]
    stream: str
    subject_prefix: str
    replicas: int
    storage: StorageType
    connect_timeout: float
    publish_timeout: float
    randomize: bool
    max_bytes: int

    @classmethod
    def parse(cls, url: str) -> NatsOptions:
        """`nats://[auth@]h1:p1,h2:p2/?query`: one server URL per host, defaults filled in."""
        parts = urlsplit(url)
        scheme = "tls" if parts.scheme.lower() == "tls" else "nats"
        auth, _, hosts = parts.netloc.rpartition("@")
        servers = []
        for host in hosts.split(","):
            host = host.strip()
            if not host:
                continue
            if ":" not in host.rpartition("]")[2]:
                host += ":4222"
            servers.append(f"{scheme}://{auth + '@' if auth else ''}{host}")
        _, query = split_options(url, URL_OPTIONS)
        options = {**URL_OPTIONS, **query}
        if options["randomize"] not in ("true", "false"):
            raise LayerConfigurationError("randomize must be 'true' or 'false'")
        if options["storage"] not in ("file", "memory"):
            raise LayerConfigurationError("storage must be 'file' or 'memory'")
        try:
            return cls(
                servers=servers or [f"{scheme}://127.0.0.1:4222"],
                stream=options["stream"],
                subject_prefix=options["subject_prefix"],
                replicas=int(options["replicas"]),
                storage=StorageType(options["storage"]),
                connect_timeout=float(options["connect_timeout"]),
                publish_timeout=float(options["publish_timeout"]),
                randomize=options["randomize"] == "true",
                max_bytes=int(options["max_bytes"]),
            )
        except ValueError as exc:
            raise LayerConfigurationError(f"invalid nats:// URL option: {exc}") from None


def check_names(stream: str, prefix: str, replicas: int) -> None:
    if not STREAM_NAME.fullmatch(stream):
        raise LayerConfigurationError(
            f"invalid stream name {stream!r}: use 1-64 letters, digits, '_' and '-'"
        )
    if not PREFIX.fullmatch(prefix):
        raise LayerConfigurationError(
            f"invalid subject_prefix {prefix!r}: use dot-separated tokens of letters, "
            "digits and '_ - : @'"
        )
    if not 1 <= replicas <= 5:
        raise LayerConfigurationError("replicas must be 1 to 5")


def parse_id(id: str) -> int | None:
    """The stream sequence of an id this layer issued: canonical decimal."""
    if not (id.isascii() and id.isdigit()) or len(id) > 19 or str(int(id)) != id:
        return None
    return int(id)


class NoSuchConsumer(Exception):
    """A pull found no consumer of that name: deleted, or lost with a server's storage."""


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a message a JetStream consumer delivered.

    Its reply subject is `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
    <timestamp>.<pending>`, or longer with a domain and an account hash, which nats-py's metadata
    parses; the short form is read here without building the metadata objects.
    """
    tokens = msg.reply.split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return msg.metadata.sequence.stream


def decode(seq: int, msg: Msg) -> Event | None:
    """The event in a stream message; None (logged) for one the gateway did not write."""
    try:
        return Event.from_wire(str(seq), msg.data)
    except (ValueError, KeyError, TypeError):
        logger.warning("skipping message %d on %s: not written by the gateway", seq, msg.subject)
        return None


class JetStreamConnection(ChannelLayer):
    """What the parts of the NATS layer (`layers._nats_groups`, `layers._nats_publish`) need of
    the layer that holds the connection (`layers.nats_jetstream`)."""

    stream: str

    @abstractmethod
    def unavailable(self) -> AbstractContextManager[None]:
        """Turns nats-py's connection errors into `LayerUnavailable`."""

    @abstractmethod
    def _client(self) -> Client: ...

    @abstractmethod
    def _jetstream(self) -> JetStreamContext: ...

    @abstractmethod
    def subject(self, channel: str) -> str: ...
