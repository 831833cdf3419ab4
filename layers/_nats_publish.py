"""Publishing on the NATS layer: one PubAck per message, a batch's acks awaited together.

A publish is answered once the stream stored the message. Each message carries a `Nats-Msg-Id`,
so one sent again after a dropped connection or during a failover is stored once; a keyed message
(idempotent publish) carries its channel and key as that id, so JetStream's own deduplication
answers a retry with the first message's sequence (see `layers.nats_jetstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence

import anyio
import nats.js.errors
from nats.js.api import PubAck

from ._idempotency import Replayed, fingerprint, reused
from ._nats import REQUEST_TIMEOUT, JetStreamConnection
from .errors import InvalidArgument, LayerUnavailable
from .event import Message

FINGERPRINT = "Gw-Fingerprint"  # header of a keyed message: `layers._idempotency.fingerprint`


class JetStreamPublishing(JetStreamConnection):
    """The publishing part of `NatsJetStreamLayer`."""

    where: str
    publish_timeout: float
    _lost: anyio.Event  # set while the connection is down

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        if len(messages) == 1 or any(m.idempotency_key is not None for m in messages):
            # a keyed message's duplicate must be told from this call's own retry: one by one
            return [await self._publish_one(message) for message in messages]
        return await self._publish_batch(messages)

    async def _publish_batch(self, messages: Sequence[Message]) -> list[str]:
        """Several messages in one round trip: every publish written in order, then the acks
        awaited together. A message left unacknowledged (a dropped connection, a failover) and
        those after it are sent again one by one with the same `Nats-Msg-Id`, so none is stored
        twice; a message too large for the server is refused before anything is sent."""
        js, lost = self._jetstream(), self._lost
        wires = [(self.subject(m.channel), self._payload(m), self._headers(m)) for m in messages]
        acks: list[asyncio.Future[PubAck]] = []
        ids: list[str] = []
        try:
            with contextlib.suppress(LayerUnavailable), self.unavailable():
                for subject, payload, headers in wires:
                    if lost.is_set():
                        break
                    ack = js.publish_async(subject, payload, stream=self.stream, headers=headers)
                    acks.append(await ack)
            with anyio.move_on_after(REQUEST_TIMEOUT):
                async with anyio.create_task_group() as tasks:

                    async def give_up_when_lost() -> None:
                        await lost.wait()
                        tasks.cancel_scope.cancel()

                    tasks.start_soon(give_up_when_lost)
                    with contextlib.suppress(Exception):
                        for pending in acks:
                            ids.append(str((await pending).seq))
                    tasks.cancel_scope.cancel()
        finally:
            for pending in acks[len(ids) :]:
                pending.cancel()  # frees its slot in nats-py's table of pending acks
        for (_, _, headers), message in zip(wires[len(ids) :], messages[len(ids) :], strict=True):
            ids.append(await self._publish_one(message, headers))
        return ids

    def _payload(self, message: Message) -> bytes:
        payload, limit = message.to_wire(), self._client().max_payload
        if len(payload) > limit:
            raise InvalidArgument(f"message larger than the NATS server accepts ({limit} bytes)")
        return payload

    @staticmethod
    def _headers(message: Message) -> dict[str, str]:
        key = message.idempotency_key
        if key is None:
            return {"Nats-Msg-Id": uuid.uuid4().hex}
        # a channel name holds no space, so this never equals another channel's id
        return {"Nats-Msg-Id": f"{message.channel} {key}", FINGERPRINT: fingerprint(message)}

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
