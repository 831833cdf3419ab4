"""Publishing on the NATS layer: a batch in one write, answered by what the stream stored.

A publish is answered once the stream stored the message. Each message carries a `Nats-Msg-Id`,
so one sent again after a dropped connection or during a failover is stored once; a keyed message
(idempotent publish) carries its channel and key as that id, so JetStream's own deduplication
answers a retry with the first message's sequence (see `layers.nats_jetstream`).

A batch (what the group commit hands over) is written as one block of HPUB commands in one
flush, with no reply subject: the layer's live consumer, which reads the whole stream anyway,
delivers each stored message with its stream sequence and its `Nats-Msg-Id`, and that copy is the
message's acknowledgement (on a replicated stream a consumer sees only what a quorum stored).
A PubAck per message would be a second message in for every one out: under the publish benchmark
(py-spy, one process, 32 messages per batch) nats-py's per-message `publish_async` (a future, a
semaphore slot, a token, a header dictionary: 10% of the server's CPU), the uuid4 of each id (3%)
and each PubAck's way in (read loop, subscription task, JSON, dataclass: about 10%) took about a
quarter of it. A message whose copy does not come within `REQUEST_TIMEOUT` (a dropped
connection, a failover, a live consumer being recreated, a message the server refused) is sent
again, it and those after it, one by one with its `Nats-Msg-Id` through JetStream's publish
request: its PubAck names the stored message's sequence, or the error.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Sequence

import anyio
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ._idempotency import Replayed, fingerprint, reused
from ._nats import REQUEST_TIMEOUT, JetStreamConnection
from .errors import InvalidArgument, LayerUnavailable
from .event import Message

FINGERPRINT = "Gw-Fingerprint"  # header of a keyed message: `layers._idempotency.fingerprint`
MSG_ID = "Nats-Msg-Id"
# The headers of a message of a batch: its id, and the stream that must store it.
HEAD = b"NATS/1.0\r\nNats-Msg-Id: %b\r\nNats-Expected-Stream: %b\r\n\r\n"


class _Batch:
    """The messages of one batch awaiting their copy from the live consumer: the stream
    sequence of each, None until it arrived."""

    __slots__ = ("done", "missing", "seqs")

    def __init__(self, size: int) -> None:
        self.seqs: list[int | None] = [None] * size
        self.missing = size
        self.done = anyio.Event()

    def stored(self, index: int, seq: int) -> None:
        if self.seqs[index] is None:
            self.seqs[index] = seq
            self.missing -= 1
            if not self.missing:
                self.done.set()


class JetStreamPublishing(JetStreamConnection):
    """The publishing part of `NatsJetStreamLayer`."""

    where: str
    publish_timeout: float
    _lost: anyio.Event  # set while the connection is down

    def __init__(self) -> None:
        super().__init__()
        self._batches: set[_Batch] = set()  # batches awaiting their messages
        self._awaiting: dict[str, tuple[_Batch, int]] = {}  # Nats-Msg-Id -> its batch, index
        # Message ids: unique per process (64 random bits) and per message (a counter); the
        # stream remembers them for its duplicate window.
        self._msg_id_prefix = uuid.uuid4().hex[:16] + "-"
        self._msg_numbers = itertools.count()

    # -- publishing ------------------------------------------------------------------------------

    def _confirm(self, msg: Msg, seq: int) -> None:
        """The live consumer delivered stream message `seq`: a publish awaiting it is stored."""
        if self._awaiting:
            headers = msg.headers
            if headers:
                entry = self._awaiting.pop(headers.get(MSG_ID, ""), None)
                if entry is not None:
                    entry[0].stored(entry[1], seq)

    def _abandon_batches(self) -> None:
        """The connection dropped: no batch in flight gets its missing messages now."""
        for batch in self._batches:
            batch.done.set()

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        if any(m.idempotency_key is not None for m in messages):
            # a keyed message's duplicate must be told from this call's own retry: one by one
            return [await self._publish_one(message) for message in messages]
        return await self._publish_batch(messages)

    async def _publish_batch(self, messages: Sequence[Message]) -> list[str]:
        """Every message written in order in one flush, then their copies from the live
        consumer awaited together. A message whose copy did not come (a dropped connection, a
        failover, a message the server refused) and those after it are sent again one by one with
        the same `Nats-Msg-Id`, so none is stored twice; a message too large for the server is
        refused before anything is sent."""
        nc, lost = self._client(), self._lost
        payloads = [self._payload(m) for m in messages]
        msg_ids = [f"{self._msg_id_prefix}{next(self._msg_numbers)}" for _ in messages]
        batch = _Batch(len(messages))
        self._batches.add(batch)
        try:
            if not lost.is_set() and nc.is_connected and not nc.is_draining:
                stream = self.stream.encode()
                commands = []
                for index, (message, payload, msg_id) in enumerate(
                    zip(messages, payloads, msg_ids, strict=True)
                ):
                    self._awaiting[msg_id] = (batch, index)
                    head = HEAD % (msg_id.encode(), stream)
                    commands.append(
                        b"HPUB %b %d %d\r\n%b%b\r\n"
                        % (
                            self.subject(message.channel).encode(),
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
            self._batches.discard(batch)
            for msg_id in msg_ids:
                self._awaiting.pop(msg_id, None)
        ids: list[str] = []
        for seq in batch.seqs:
            if seq is None:
                break
            ids.append(str(seq))
        for message, msg_id in zip(messages[len(ids) :], msg_ids[len(ids) :], strict=True):
            ids.append(await self._publish_one(message, {MSG_ID: msg_id}))
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
            return {MSG_ID: f"{self._msg_id_prefix}{next(self._msg_numbers)}"}
        # a channel name holds no space, so this never equals another channel's id
        return {MSG_ID: f"{message.channel} {key}", FINGERPRINT: fingerprint(message)}

    async def _publish_one(self, message: Message, headers: dict[str, str] | None = None) -> str:
        key = message.idempotency_key
        headers = headers or self._headers(message)
        subject, payload = self.subject(message.channel), self._payload(message)
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
