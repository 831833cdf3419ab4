"""Publishing on the NATS layer: one PubAck per message, a batch's acks awaited together.

A publish is answered once the stream stored the message. Each message carries a `Nats-Msg-Id`,
so one sent again after a dropped connection or during a failover is stored once; a keyed message
(idempotent publish) carries its channel and key as that id, so JetStream's own deduplication
answers a retry with the first message's sequence (see `layers.nats_jetstream`).

A batch (what the group commit hands over) is written as one block of HPUB commands, one flush,
its PubAcks arriving on one wildcard reply subscription per connection: message `i` of batch `b`
asks for its ack on `<inbox>.<b>.<i>`, and the batch is done when every message has an answer.
This is what nats-py's own request mux and `publish_async` do, without a future, a task, a
semaphore slot and a header dictionary per message: a profile of the publish benchmark (py-spy,
one process, 32 messages per batch) had nats-py's per-message publish machinery, the uuid4 of each
message id and the PubAck's JSON and dataclass at a third of the server's CPU. A message left
without an ack (a dropped connection, a failover, an error answer) is sent again, it and those
after it, one by one with its `Nats-Msg-Id` through JetStream's publish request, which answers the
stored message's sequence and raises what the server says. Keyed messages go in the same
batches: a PubAck marked `duplicate` answers a key published before, and the stored message's
fingerprint tells a replay from a key reused with another body.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Sequence

import anyio
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from ._idempotency import Replayed, fingerprint, reused
from ._nats import REQUEST_TIMEOUT, JetStreamConnection
from .errors import InvalidArgument, LayerUnavailable
from .event import Message

FINGERPRINT = "Gw-Fingerprint"  # header of a keyed message: `layers._idempotency.fingerprint`


class _Batch:
    """The PubAcks of one batch: the stream sequence of each message, None while unanswered or
    when the server answered an error, and which were duplicates of a stored message."""

    __slots__ = ("answered", "done", "duplicates", "seqs")

    def __init__(self, size: int) -> None:
        self.seqs: list[int | None] = [None] * size
        self.duplicates: set[int] = set()
        self.answered = 0
        self.done = anyio.Event()

    def take(self, index: int, data: bytes) -> None:
        if self.seqs[index] is not None:
            return
        try:
            ack = orjson.loads(data)  # b"" is a status message: no responders (no stream)
            seq = ack["seq"] if "error" not in ack else None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            seq = None
        self.seqs[index] = seq if isinstance(seq, int) and seq > 0 else None
        if self.seqs[index] is not None and ack.get("duplicate"):
            self.duplicates.add(index)
        self.answered += 1
        if self.answered >= len(self.seqs):
            self.done.set()


def _head(headers: dict[str, str], stream: bytes) -> bytes:
    """The header block of a message of a batch: its own headers, and the stream that must store
    it."""
    lines = b"".join(
        b"%b: %b\r\n" % (name.encode(), value.encode()) for name, value in headers.items()
    )
    return b"NATS/1.0\r\n" + lines + b"Nats-Expected-Stream: " + stream + b"\r\n\r\n"


class JetStreamPublishing(JetStreamConnection):
    """The publishing part of `NatsJetStreamLayer`."""

    where: str
    publish_timeout: float
    _lost: anyio.Event  # set while the connection is down

    def __init__(self) -> None:
        super().__init__()
        self._batches: dict[int, _Batch] = {}  # batch number -> its acks, while awaited
        self._batch_numbers = itertools.count()
        self._reply_prefix = ""  # `<inbox>.`: the reply subscription is `<inbox>.>`
        # Message ids: unique per process (64 random bits) and per message (a counter); the
        # stream remembers them for its duplicate window.
        self._msg_id_prefix = uuid.uuid4().hex[:16] + "-"
        self._msg_numbers = itertools.count()

    # -- publishing ------------------------------------------------------------------------------

    async def _listen_for_acks(self, nc: Client) -> None:
        """Subscribe the PubAck mux of this connection (nats-py renews it after a reconnect)."""
        self._reply_prefix = nc.new_inbox() + "."
        with self.unavailable():
            await nc.subscribe(self._reply_prefix + ">", cb=self._on_ack)

    async def _on_ack(self, msg: Msg) -> None:
        number, _, index = msg.subject[len(self._reply_prefix) :].partition(".")
        try:
            batch = self._batches.get(int(number))
            if batch is not None:
                batch.take(int(index), msg.data)
        except (ValueError, IndexError):
            return  # not an inbox this layer asked for

    def _abandon_acks(self) -> None:
        """The connection dropped: no batch in flight gets its missing acks now."""
        for batch in self._batches.values():
            batch.done.set()

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        """Every message written in order in one flush, then the acks awaited together. A
        message left unacknowledged (a dropped connection, a failover) and those after it are sent
        again one by one with the same `Nats-Msg-Id`, so none is stored twice; a message too large
        for the server is refused before anything is sent. A keyed message acknowledged as a
        duplicate was published before with its key: a replay, if its body is the same."""
        nc, lost = self._client(), self._lost
        payloads = [self._payload(m) for m in messages]
        headers = [self._headers(m) for m in messages]
        deadline = time.monotonic() + self.publish_timeout
        number = next(self._batch_numbers)
        batch = self._batches[number] = _Batch(len(messages))
        try:
            if not lost.is_set() and nc.is_connected and not nc.is_draining:
                reply = f"{self._reply_prefix}{number}.".encode()
                stream = self.stream.encode()
                commands = []
                for index, (message, payload, fields) in enumerate(
                    zip(messages, payloads, headers, strict=True)
                ):
                    head = _head(fields, stream)
                    commands.append(
                        b"HPUB %b %b%d %d %d\r\n%b%b\r\n"
                        % (
                            self.subject(message.channel).encode(),
                            reply,
                            index,
                            len(head),
                            len(head) + len(payload),
                            head,
                            payload,
                        )
                    )
                with contextlib.suppress(LayerUnavailable), self.unavailable():
                    await self._write(nc, b"".join(commands), len(commands))
                    if not lost.is_set():
                        with anyio.move_on_after(min(REQUEST_TIMEOUT, self.publish_timeout)):
                            await batch.done.wait()
        finally:
            del self._batches[number]
        ids: list[str] = []
        for index, seq in enumerate(batch.seqs):
            if seq is None:
                break
            message = messages[index]
            if index in batch.duplicates and message.idempotency_key is not None:
                replay = Replayed(str(seq))
                await self._check_fingerprint(message, headers[index][FINGERPRINT], replay)
                ids.append(replay)
            else:
                ids.append(str(seq))  # a duplicate of an unkeyed message is this call's retry
        for message, fields in zip(messages[len(ids) :], headers[len(ids) :], strict=True):
            ids.append(await self._publish_one(message, fields, deadline))
        return ids

    @staticmethod
    async def _write(nc: Client, commands: bytes, count: int) -> None:
        """Hand a block of publish commands to nats-py's writer and flush it once.

        `Client.publish` builds and queues one command per call (about 5 µs each, most of it
        checks and header encoding done here once); these are the two steps it ends with.
        """
        nc.stats["out_msgs"] += count
        await nc._send_command(commands)
        await nc._flush_pending()

    def _payload(self, message: Message) -> bytes:
        payload, limit = message.to_wire(), self._client().max_payload
        if len(payload) > limit:
            raise InvalidArgument(f"message larger than the NATS server accepts ({limit} bytes)")
        return payload

    def _headers(self, message: Message) -> dict[str, str]:
        key = message.idempotency_key
        if key is None:
            return {"Nats-Msg-Id": f"{self._msg_id_prefix}{next(self._msg_numbers)}"}
        # a channel name holds no space, so this never equals another channel's id
        return {"Nats-Msg-Id": f"{message.channel} {key}", FINGERPRINT: fingerprint(message)}

    async def _publish_one(
        self,
        message: Message,
        headers: dict[str, str] | None = None,
        deadline: float | None = None,
    ) -> str:
        key = message.idempotency_key
        headers = headers or self._headers(message)
        subject, payload = self.subject(message.channel), self._payload(message)
        if deadline is None:
            deadline = time.monotonic() + self.publish_timeout
        while True:
            attempt = min(REQUEST_TIMEOUT, max(0.1, deadline - time.monotonic()))
            try:
                seq = await self._attempt(subject, payload, headers, attempt)
            except LayerUnavailable:
                seq = None
                if time.monotonic() + 0.1 >= deadline:
                    raise
            if seq is not None:
                if isinstance(seq, Replayed) and key is not None:
                    await self._check_fingerprint(message, headers[FINGERPRINT], seq)
                    return seq
                return str(seq)  # a duplicate of an unkeyed message is this call's own retry
            # Sent again with the same Nats-Msg-Id, a publish that did reach the stream is not
            # stored twice: retrying through a failover is safe.
            if time.monotonic() + 0.1 >= deadline:
                raise LayerUnavailable(f"{self.where}: no server took the message; retry later")
            await anyio.sleep(0.1)

    async def _attempt(
        self, subject: str, payload: bytes, headers: dict[str, str], wait: float
    ) -> str | None:
        """One publish request: its sequence, or None when the connection dropped first.

        A request in flight on a connection that broke is never answered; waiting for its
        timeout would stall the publish long after the client has reconnected elsewhere.
        """
        js, lost = self._jetstream(), self._lost
        if lost.is_set():
            return None
        done: list[str] = []
        failed: list[LayerUnavailable] = []
        async with anyio.create_task_group() as tasks:

            async def give_up_when_lost() -> None:
                await lost.wait()
                tasks.cancel_scope.cancel()

            tasks.start_soon(give_up_when_lost)
            try:
                with self.unavailable():
                    ack = await js.publish(
                        subject, payload, timeout=wait, stream=self.stream, headers=headers
                    )
                done.append(Replayed(str(ack.seq)) if ack.duplicate else str(ack.seq))
            except LayerUnavailable as exc:
                failed.append(exc)
            tasks.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return done[0] if done else None

    async def _check_fingerprint(self, message: Message, expected: str, seq: str) -> None:
        """The stream already holds a message with this key: refuse another body.

        The stored message is the record of the key. One that limits have removed meanwhile can
        no longer be compared, and the duplicate is answered as a replay.
        """
        with self.unavailable():
            try:
                stored = await self._jetstream().get_msg(self.stream, seq=int(seq))
            except nats.js.errors.NotFoundError:
                return
        if (stored.headers or {}).get(FINGERPRINT, expected) != expected:
            raise reused(message, seq)
