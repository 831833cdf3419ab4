"""`nats://`: NATS JetStream, one stream for every channel, durable consumers for groups (nats-py).

Design decisions:

- Every channel lives in one stream (`?stream=`, default `GATEWAY`) under one subject prefix
  (`?subject_prefix=`, default `gw`): channel `a.b` is the subject `gw.a.b`. Ids are stream
  sequences, so they are ordered across channels and one `Last-Event-ID` places a resuming
  subscriber in every channel and pattern it follows. The stream is created at start-up, or updated
  to this process's limits (`history_size` per channel as `max_msgs_per_subject`, `history_ttl` as
  `max_age`, `?max_bytes=` for the whole stream, `?replicas=`); one that exists with settings the
  layer cannot work with (other subjects, another retention or storage) is refused with what to
  change.
- Live delivery: one ordered consumer per process over the whole prefix (`gw.>`), not a core
  subscription. A core subscriber never learns a message's stream sequence (only the publisher
  gets it, in the PubAck), so it could give no ids; and it loses whatever is published while its
  connection is down. The ordered consumer carries the sequence of each message, and after a
  dropped connection, a restarted server or a failed cluster node it is recreated from the last
  sequence delivered, so nothing is lost or repeated. The layer hands on only the messages of
  channels and patterns this process subscribes to, matched exactly with `layers.names`; NATS
  2.9 takes one filter per consumer, which for several channels would be the prefix anyway.
- The live consumer runs only while this process subscribes to something: a process that only
  publishes (an API node) reads nothing of the stream. The first subscription starts it just
  after the stream's last sequence, read before it is created, so every message published once
  `subscribe` returns is delivered; the last unsubscription deletes it. A lock orders starts and
  stops, and a start is shielded from cancellation, so a consumer runs exactly while something is
  subscribed.
- Replay reads with short-lived pull consumers, one per subject filter: a channel is its subject,
  a pattern the widest literal head it starts with (`chat.rooms.*` -> `gw.chat.rooms.>`, since a
  glob `*` spans dots and a NATS `*` does not), then matched exactly. A replay of something
  subscribed returns only once the live consumer has passed the newest replayed sequence (a
  consumer just started begins past it, or delivers it), so the core's hand-off can drop every
  replayed event it held aside and none arrives live after it.
- Gaps: trimming removes the oldest messages of a subject first; expiry and `max_bytes` the
  oldest of the stream. After id P a channel lost messages if it holds `history_size` messages
  all newer than P (conservative by one: exactly `history_size` new messages since P also counts
  as a gap), or, with a TTL or `max_bytes`, if the stream's oldest message is newer than P + 1.
- Control messages (`ChannelLayer.broadcast`) are core NATS messages on `$GW.<prefix>.broadcast`,
  outside every stream (no subject prefix starts with `$`), with one core subscription per process
  that nats-py restores after a reconnect.
- Publishing waits for the PubAck. Each message carries a `Nats-Msg-Id`, so a publish retried after
  a timeout (a node failing, a leader being elected) within `publish_timeout` is stored once.
- Idempotent publish is JetStream's own deduplication: a keyed message's `Nats-Msg-Id` is its
  channel and key, and the stream's duplicate window is the idempotency TTL (at least
  `publish_timeout`, at most `max_age`).
  A duplicate's PubAck carries the first message's sequence, the id to answer; the first
  message, which carries the fingerprint of its body in a header, is the record against which
  a different body is refused.
- Consumer groups: see `layers._nats_groups`.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StreamConfig,
    StreamInfo,
)

from ._idempotency import DEFAULT_TTL
from ._nats import (
    REQUEST_TIMEOUT,
    UNAVAILABLE,
    NatsOptions,
    NoSuchConsumer,
    check_names,
    decode,
    parse_id,
    stream_sequence,
)
from ._nats_groups import JetStreamGroups
from ._nats_publish import JetStreamPublishing
from ._supervisor import Supervisor
from .base import Capabilities, Replay, Sink
from .errors import InvalidArgument, LayerConfigurationError, LayerUnavailable
from .event import Event
from .names import compile_pattern, is_pattern

logger = logging.getLogger("layers.nats")

HEARTBEAT = 1.0  # the live consumer's idle heartbeat; two missed ones recreate it
PULL_BATCH = 500


class NatsJetStreamLayer(JetStreamGroups, JetStreamPublishing):
    """Cross-process channels with history and consumer groups on NATS JetStream."""

    scheme = "nats"
    capabilities = Capabilities(cross_process=True, history=True, groups=True, idempotency=True)

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        history_ttl: float | None = None,
        stream: str | None = None,
        subject_prefix: str | None = None,
        replicas: int | None = None,
        idempotency_ttl: float = DEFAULT_TTL,
    ) -> None:
        """`url` is `nats://[user:password@]host:port[,host2:port,...][?option=value&...]`.

        Options missing from the arguments are read from the URL query: `stream` (`GATEWAY`),
        `subject_prefix` (`gw`), `replicas` (1), `storage` (`file` or `memory`),
        `max_bytes` (the stream's size limit; unlimited), `connect_timeout` (5 s),
        `publish_timeout` (5 s: how long a publish retries through a failover before it answers
        "unavailable") and `randomize` (`true`: try the seed list in
        random order, which spreads gateways over the servers). `tls://` connects with TLS.
        """
        options = NatsOptions.parse(url)
        self.servers = options.servers
        self.stream = stream or options.stream
        self.prefix = subject_prefix or options.subject_prefix
        self.replicas = replicas if replicas is not None else options.replicas
        self.storage = options.storage
        self.connect_timeout = options.connect_timeout
        self.publish_timeout = options.publish_timeout
        self.randomize = options.randomize
        self.max_bytes = options.max_bytes
        check_names(self.stream, self.prefix, self.replicas)
        if history_size < 1:
            raise LayerConfigurationError("history_size must be at least 1")
        super().__init__()
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.idempotency_ttl = idempotency_ttl
        self.where = "NATS at " + ",".join(
            urlsplit(s).netloc.rpartition("@")[2] for s in self.servers
        )
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sink: Sink | None = None
        self._channels: set[str] = set()
        self._patterns: dict[str, Any] = {}  # subscribed glob -> its matcher
        # the live ordered consumer, while anything is subscribed; the lock orders starts and stops
        self._live: JetStreamContext.PushSubscription | None = None
        self._live_lock = anyio.Lock()
        self._delivered = 0  # the live consumer has handed on every sequence up to this one
        # made by a waiter, set (and dropped) when `_delivered` moves or the live consumer stops:
        # none while nobody waits
        self._progress: anyio.Event | None = None
        self._connected = False
        self._closing = False
        self._lost = anyio.Event()  # set when the connection drops, replaced when it is back
        self._broadcast_subject = f"$GW.{self.prefix}.broadcast"

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        # The supervisor makes the first connection (a seed list that answers nothing at
        # start-up is retried, readiness red meanwhile); after it, nats-py reconnects by itself.
        self._sink = sink
        try:
            await Supervisor(self.where, sink, logger).run(self._serve, task_status=task_status)
        finally:
            self._sink = None

    async def _serve(self, ready: Callable[[], None]) -> None:
        nc = await self._connect()
        try:
            self._nc, self._js = nc, nc.jetstream(timeout=REQUEST_TIMEOUT)
            await self._ensure_stream()
            await self._listen_for_acks(nc)
            with self.unavailable():
                await nc.subscribe(self._broadcast_subject, cb=self._on_broadcast)
            async with self._live_lock:
                if self._channels or self._patterns:  # subscribed while an earlier attempt ran
                    await self._follow(self._delivered)
            with self.unavailable():
                await nc.subscribe(self.notices_subject, cb=self._on_notice)
            ready()
            await anyio.sleep_forever()
        finally:
            self._nc = self._js = None
            self._live = None  # closed with its connection
            self._abandon_acks()
            await self._close(nc)

    async def _close(self, nc: Client) -> None:
        self._closing = True  # what the client reports while closing is no lost connection
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await nc.close()
        finally:
            self._closing = False

    async def _connect(self) -> Client:
        async def disconnected() -> None:
            self._connected = False
            self._lost.set()
            self._abandon_acks()
            if self._sink is None or self._closing:
                return
            logger.warning("%s: connection lost; reconnecting", self.where)

        async def reconnected() -> None:
            self._connected = True
            self._lost = anyio.Event()
            logger.info("%s: reconnected", self.where)
            if self._sink is not None:
                self._sink.reconnected()

        async def error(exc: Exception) -> None:
            # While disconnected every reconnect attempt fails: the disconnect was logged once.
            level = logging.WARNING if self._connected else logging.DEBUG
            logger.log(level, "%s: %s: %s", self.where, type(exc).__name__, exc)
            if self._sink is not None:
                self._sink.layer_error(exc)

        nc = Client()
        # nats-py retries the first connection for ever when reconnecting is unlimited; the
        # gateway must not hang at start-up, so the first connection gets a deadline.
        deadline = self.connect_timeout * len(self.servers) + 1
        try:
            with anyio.fail_after(deadline):
                await nc.connect(
                    servers=self.servers,
                    # annotated as int, used as seconds: fractions work
                    connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    dont_randomize=not self.randomize,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    # Nothing is buffered while reconnecting: a publish that answered
                    # "unavailable" must not be sent after all once the connection is back.
                    pending_size=0,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                    name=f"channels-gateway:{uuid.uuid4().hex[:8]}",
                )
        except UNAVAILABLE as exc:
            await self._close(nc)
            raise LayerUnavailable(
                f"{self.where} is unavailable ({type(exc).__name__}: {str(exc) or 'timed out'}); "
                "check that nats-server is running with JetStream (-js) and the nats:// URL"
            ) from None
        self._connected = True
        self._lost = anyio.Event()  # an attempt that failed before this one had set it
        return nc

    async def _ensure_stream(self) -> StreamInfo:
        """Create the stream, or bring an existing one to this layer's limits."""
        js = self._jetstream()
        subjects = [f"{self.prefix}.>"]
        ttl = self.history_ttl or 0.0
        # JetStream remembers each Nats-Msg-Id this long: the idempotency TTL, but at least as long
        # as the layer's own retries of a publish go on, and within the stream's max_age.
        window = max(self.idempotency_ttl, self.publish_timeout)
        window = min(window, ttl) if ttl else window
        config = StreamConfig(
            name=self.stream,
            description="channels-gateway: every channel, one subject each",
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=self.storage,
            num_replicas=self.replicas,
            max_msgs_per_subject=self.history_size,
            max_age=ttl,
            max_bytes=self.max_bytes,
            discard=DiscardPolicy.OLD,
            duplicate_window=window,
        )
        with self.unavailable():
            try:
                existing = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                existing = None
            try:
                if existing is None:
                    return await js.add_stream(config)
                self._check_compatible(existing, subjects)
                current = existing.config
                if (
                    current.num_replicas != self.replicas
                    or current.max_msgs_per_subject != self.history_size
                    or (current.max_age or 0.0) != ttl
                    or (current.max_bytes or -1) != self.max_bytes
                    or current.duplicate_window != window
                ):
                    return await js.update_stream(config)
                return existing
            except nats.js.errors.APIError as exc:
                if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                    raise
                raise LayerConfigurationError(
                    f"{self.where} refused the stream {self.stream!r}: {exc.description}; "
                    "choose another ?stream= or ?subject_prefix=, or fix ?replicas= "
                    "(at most the number of JetStream servers)"
                ) from None

    def _check_compatible(self, existing: StreamInfo, subjects: list[str]) -> None:
        current = existing.config
        problems = []
        if sorted(current.subjects or []) != subjects:
            problems.append(f"subjects {current.subjects} instead of {subjects}")
        if current.retention not in (None, RetentionPolicy.LIMITS):
            problems.append(f"retention {current.retention} instead of limits")
        if current.storage != self.storage:
            problems.append(f"storage {current.storage} instead of {self.storage}")
        if current.discard not in (None, DiscardPolicy.OLD):
            problems.append("discard new instead of old")
        if current.sealed or current.mirror or current.sources:
            problems.append("it is sealed, a mirror or sourced")
        if problems:
            raise LayerConfigurationError(
                f"the NATS stream {self.stream!r} exists with {'; '.join(problems)}; use another "
                f"?stream= name, or remove it (nats stream rm {self.stream}) to have it recreated"
            )

    # -- connections and errors ------------------------------------------------------------------

    @contextmanager
    def unavailable(self) -> Iterator[None]:
        """Turn "the server cannot be reached" into `LayerUnavailable` (HTTP 503)."""
        try:
            yield
        except nats.errors.MaxPayloadError as exc:
            raise InvalidArgument(f"message larger than the NATS server accepts: {exc}") from None
        except UNAVAILABLE as exc:
            raise LayerUnavailable(
                f"{self.where} is unavailable ({type(exc).__name__}: {str(exc) or 'timed out'}); "
                "retry later"
            ) from exc

    def _client(self) -> Client:
        if self._nc is None:
            if self._sink is not None:
                raise LayerUnavailable(f"{self.where}: no server answers; connecting")
            raise LayerUnavailable(
                "the nats:// layer is not running; use it inside 'async with Channel(layer)'"
            )
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        self._client()
        assert self._js is not None
        return self._js

    def subject(self, channel: str) -> str:
        return f"{self.prefix}.{channel}"

    def channel_of(self, subject: str) -> str:
        return subject[len(self.prefix) + 1 :]

    # -- live delivery ---------------------------------------------------------------------------

    async def _follow(self, last_seq: int) -> None:
        """Start the live ordered consumer just after `last_seq` (under `_live_lock`)."""
        self._delivered = last_seq
        self._wake()
        # Shielded (each request has its timeout): a subscribe cancelled half-way must not leave
        # a consumer on the server that nothing here stops.
        with anyio.CancelScope(shield=True), self.unavailable():
            subscription = self._live = await self._jetstream().subscribe(
                f"{self.prefix}.>",
                stream=self.stream,
                cb=self._on_live,
                ordered_consumer=True,
                idle_heartbeat=HEARTBEAT,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=last_seq + 1),
            )
        # nats-py recreates an ordered consumer from the last sequence it delivered, which starts
        # at 0: before the first message, a reset would replay the whole stream (each message
        # then skipped by `_on_live`). Tell it where this one started.
        jsi = getattr(subscription._sub, "_jsi", None)
        if jsi is not None:
            jsi._sseq = last_seq

    async def _stop(self) -> None:
        """Unsubscribe the live consumer and delete it on the server (under `_live_lock`)."""
        live, self._live = self._live, None
        if live is None:
            return
        self._wake()  # a replay waiting on `_delivered` has nothing left to wait for
        # Should the deletion fail, the server drops the consumer, which has no subscriber left.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(REQUEST_TIMEOUT),
            contextlib.suppress(*UNAVAILABLE),
        ):
            await live.unsubscribe()
            await self._jetstream().delete_consumer(self.stream, live._consumer)

    async def _on_live(self, msg: Msg) -> None:
        seq = stream_sequence(msg)
        if seq <= self._delivered:
            return  # a recreated consumer never repeats, but a stale redelivery must not either
        self._delivered = seq
        channel = self.channel_of(msg.subject)
        if self._sink is not None and self._wants(channel):
            event = decode(seq, msg)
            if event is not None:
                self._sink.deliver(event)
        self._wake()

    def _wake(self) -> None:
        """Wake whoever waits on `_delivered` (`_delivered_up_to`)."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    def _wants(self, channel: str) -> bool:
        return channel in self._channels or any(m(channel) for m in self._patterns.values())

    async def _on_broadcast(self, msg: Msg) -> None:
        if self._sink is not None:
            self._sink.broadcast(msg.data)

    async def broadcast(self, blob: bytes) -> None:
        nc = self._client()
        with self.unavailable():
            await nc.publish(self._broadcast_subject, blob)
            await nc.flush(timeout=REQUEST_TIMEOUT)  # type: ignore[arg-type]

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """The first subscription starts the live consumer just after the stream's last
        sequence; while it runs, it reads every channel of the stream, and a subscription is
        effective at once. Raises `LayerUnavailable` when the consumer cannot be started."""
        matchers = {pattern: compile_pattern(pattern) for pattern in patterns}
        async with self._live_lock:
            if self._live is None and (channels or patterns):
                with self.unavailable():
                    info = await self._jetstream().stream_info(self.stream)
                await self._follow(info.state.last_seq)
            self._channels.update(channels)
            self._patterns.update(matchers)

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """The last unsubscription stops the live consumer."""
        async with self._live_lock:
            self._channels.difference_update(channels)
            for pattern in patterns:
                self._patterns.pop(pattern, None)
            if not self._channels and not self._patterns:
                await self._stop()

    async def ping(self) -> None:
        nc = self._client()
        if not self._connected or not nc.is_connected:
            raise LayerUnavailable(f"{self.where}: no server answers; reconnecting")
        with self.unavailable():
            await self._jetstream().stream_info(self.stream)

    # -- history ---------------------------------------------------------------------------------

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        js = self._jetstream()
        with self.unavailable():
            state = (await js.stream_info(self.stream)).state
        gap, reason, start = False, "evicted", 1
        if after is not None:
            position = parse_id(after)
            if position is None or position > state.last_seq:
                gap, reason = True, "unknown_id"  # not an id of this stream (was it recreated?)
            else:
                start = position + 1
                gap = await self._evicted_after(position, state.first_seq, channels, patterns)
        names, matchers = set(channels), [compile_pattern(p) for p in patterns]
        reads = [
            await self._read(subject_filter, start, limit if after is not None else None)
            for subject_filter in self._filters(channels, patterns)
        ]
        events: list[Event] = []
        seen: set[int] = set()
        for seq, msg in heapq.merge(*reads, key=lambda pair: pair[0]):
            channel = self.channel_of(msg.subject)
            if seq in seen or not (channel in names or any(m(channel) for m in matchers)):
                continue
            seen.add(seq)
            event = decode(seq, msg)
            if event is not None:
                events.append(event)
        if limit is not None:
            events = events[:limit] if after is not None else events[-limit:]
        if events and (names & self._channels or set(patterns) & self._patterns.keys()):
            await self._delivered_up_to(int(events[-1].id))
        return Replay(events, gap=gap, reason=reason if gap else None)

    def _filters(self, channels: Collection[str], patterns: Collection[str]) -> list[str]:
        """The subject filters that cover these channels and patterns, none inside another."""
        filters = {self.subject(c) for c in channels}
        for pattern in patterns:
            head = []
            for token in pattern.split("."):
                if is_pattern(token):
                    break
                head.append(token)
            # The literal tokens before the first wildcard, then anything: a glob's `*` spans dots.
            filters.add(".".join([self.prefix, *head, ">"]))
        wide = [f[:-1] for f in filters if f.endswith(".>")]
        return sorted(f for f in filters if not any(f.startswith(w) and f != w + ">" for w in wide))

    async def _read(
        self, subject_filter: str, start: int, limit: int | None
    ) -> list[tuple[int, Msg]]:
        """Retained messages of `subject_filter` from sequence `start`, the first `limit`."""
        js = self._jetstream()
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            filter_subject=subject_filter,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        )
        with self.unavailable():
            info = await js.add_consumer(self.stream, config)
        try:
            available = info.num_pending or 0
            wanted = available if limit is None else min(limit, available)
            out: list[tuple[int, Msg]] = []
            while len(out) < wanted:
                batch = await self.pull(info.name, min(PULL_BATCH, wanted - len(out)))
                if not batch:
                    break
                out.extend((msg.metadata.sequence.stream, msg) for msg in batch)
            return out
        finally:
            # Should this fail, the consumer goes by itself after its inactive_threshold.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(REQUEST_TIMEOUT),
                contextlib.suppress(*UNAVAILABLE),
            ):
                await js.delete_consumer(self.stream, info.name)

    async def pull(self, consumer: str, batch: int) -> list[Msg]:
        """Up to `batch` messages available to the pull consumer now, without waiting for more.

        Raises `NoSuchConsumer` when the consumer does not exist: a pull request to a missing
        consumer goes unanswered, so silence is checked with the consumer's info.
        """
        nc, js = self._client(), self._jetstream()
        messages: list[Msg] = []
        answered = False
        with self.unavailable():
            inbox = nc.new_inbox()
            subscription = await nc.subscribe(inbox)
            try:
                request = json.dumps({"batch": batch, "no_wait": True}).encode()
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}", request, reply=inbox
                )
                with anyio.move_on_after(REQUEST_TIMEOUT):
                    while len(messages) < batch:
                        msg = await subscription.next_msg(timeout=None)
                        answered = True
                        if not msg.data and (msg.headers or {}).get("Status"):
                            break  # 404 no messages, 408 timeout, 409 limits: that is all now
                        messages.append(msg)
            finally:
                with anyio.CancelScope(shield=True):
                    await subscription.unsubscribe()
            if not answered:
                try:
                    await js.consumer_info(self.stream, consumer)
                except nats.js.errors.NotFoundError:
                    raise NoSuchConsumer(consumer) from None
                raise LayerUnavailable(f"{self.where}: a pull from {consumer!r} got no answer")
        return messages

    async def _evicted_after(
        self,
        position: int,
        first_seq: int,
        channels: Collection[str],
        patterns: Collection[str],
    ) -> bool:
        """Whether messages of these channels after `position` were trimmed or expired."""
        # Expiry and the stream's byte limit remove the oldest messages of the whole stream.
        if (self.history_ttl or self.max_bytes > 0) and position + 1 < first_seq:
            return True
        js = self._jetstream()
        full: list[str] = []
        with self.unavailable():
            for subject_filter in self._filters(channels, patterns):
                info = await js.stream_info(self.stream, subjects_filter=subject_filter)
                counts = info.state.subjects or {}
                full += [s for s, n in counts.items() if n >= self.history_size]
            names, matchers = set(channels), [compile_pattern(p) for p in patterns]
            for subject in full:
                channel = self.channel_of(subject)
                if not (channel in names or any(m(channel) for m in matchers)):
                    continue
                oldest = await js.get_msg(self.stream, seq=1, subject=subject, next=True)
                if oldest.seq is not None and oldest.seq > position:
                    return True
        return False

    async def _delivered_up_to(self, seq: int) -> None:
        """Wait until live delivery has passed `seq`, or stopped (bounded: a stalled consumer
        risks a duplicate rather than a hung subscribe).

        The core holds a resuming subscriber's live events aside while it replays, then drops
        those the replay contained; an event the live consumer delivered later would be a
        duplicate. A consumer started after `seq` was stored begins past it.
        """
        with anyio.move_on_after(self.publish_timeout):
            while self._live is not None and self._delivered < seq:
                if self._progress is None:
                    self._progress = anyio.Event()
                await self._progress.wait()
