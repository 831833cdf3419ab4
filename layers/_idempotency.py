"""Idempotent publish: key validation, message fingerprints, and the in-process key table.

Design decisions:

- A key is scoped to its channel: the same key on two channels names two publishes.
- What must match for a replay is the encoded message (event type and data), compared by a
  fingerprint (BLAKE2b, 16 bytes), never the stored body, so a layer's record of a key stays
  small whatever the payload.
- A layer records a key atomically with the publish itself (one Lua script, one transaction, the
  broker's own deduplication), so concurrent duplicates never both publish and nothing is ever
  "in progress": the second of two concurrent publishes is answered from the record of the first.
- Several callers' publishes may share one layer call (the `Channel`'s group commit), and two of
  them may carry the same key: `collapse` sends such a key once, and `expand` answers the later
  copies with the first one's id as a `Replayed`, as if they had come one after the other.
- A replayed id is a `Replayed`, a `str` subclass: `ChannelLayer.publish` and
  `Channel.publish_messages` keep returning `list[str]`; callers that care ask
  `isinstance(id, Replayed)`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from .errors import IdempotencyKeyReused, InvalidArgument
from .event import Message

MAX_KEY_LENGTH = 200
KEY_RULE = f"1-{MAX_KEY_LENGTH} printable ASCII characters (0x20-0x7E)"
KEY_REGEX = rf"^[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}$"
DEFAULT_TTL = 300.0  # seconds a key is remembered


class Replayed(str):
    """The id of an earlier publish with the same key: this one published nothing."""

    __slots__ = ()


def validate_key(key: object) -> str:
    """`key` if it is 1-200 printable ASCII characters, else `InvalidArgument` stating the rule."""
    if (
        not isinstance(key, str)
        or not 0 < len(key) <= MAX_KEY_LENGTH
        or not all(" " <= char <= "~" for char in key)
    ):
        raise InvalidArgument(f"an idempotency key must be {KEY_RULE}")
    return key


def fingerprint(message: Message) -> str:
    """What identifies a message's body for its key: a hash of its event type and data."""
    digest = hashlib.blake2b(message.event.encode(), digest_size=16)
    digest.update(b"\0")
    digest.update(message.raw)
    return digest.hexdigest()


def keyed(messages: Sequence[Message]) -> bool:
    """Whether any of the messages carries an idempotency key."""
    return any(message.idempotency_key is not None for message in messages)


def check_distinct(messages: Sequence[Message]) -> None:
    """One call publishes each (channel, key) at most once, as a layer's contract asks."""
    seen: dict[tuple[str, str], int] = {}
    for index, message in enumerate(messages):
        if message.idempotency_key is None:
            continue
        first = seen.setdefault((message.channel, message.idempotency_key), index)
        if first != index:
            raise InvalidArgument(
                f"messages[{index}] repeats the idempotency key of messages[{first}] on channel "
                f"{message.channel!r}; give each message of a batch its own key"
            )


def collapse(messages: Sequence[Message]) -> tuple[Sequence[Message], list[int] | None]:
    """Several callers' messages as one layer call may take them: each (channel, key) once.

    Returns the messages to send and, when some repeated an earlier message's channel and key,
    for each given message the index of the sent one that answers for it (None when nothing
    repeats: the messages go as they are). A repeat with another body raises
    `IdempotencyKeyReused`: the callers must then go one by one, so that only the later one is
    refused with the recorded id (group commit does so on `InvalidArgument`).
    """
    first: dict[tuple[str, str], int] = {}
    repeats = False
    for index, message in enumerate(messages):
        key = message.idempotency_key
        if key is not None and first.setdefault((message.channel, key), index) != index:
            repeats = True
    if not repeats:
        return messages, None
    sent: list[Message] = []
    where: list[int] = []
    for index, message in enumerate(messages):
        key = message.idempotency_key
        earlier = first[message.channel, key] if key is not None else index
        if earlier == index:
            where.append(len(sent))
            sent.append(message)
            continue
        if fingerprint(message) != fingerprint(messages[earlier]):
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} came twice at once on channel {message.channel!r}, "
                "with two different messages; use a new key for a new message"
            )
        where.append(where[earlier])
    return sent, where


def expand(ids: list[str], where: list[int] | None) -> list[str]:
    """The ids of `collapse`'s messages from those of what it sent: a repeat gets its first
    copy's id, as a `Replayed`."""
    if where is None:
        return ids
    answered: set[int] = set()
    out: list[str] = []
    for index in where:
        id = ids[index]
        if index in answered and not isinstance(id, Replayed):
            id = Replayed(id)
        answered.add(index)
        out.append(id)
    return out


def reused(message: Message, recorded_id: str) -> IdempotencyKeyReused:
    """The one phrasing of a key sent again with another body."""
    return IdempotencyKeyReused(
        f"idempotency key {message.idempotency_key!r} was used on channel {message.channel!r} "
        f"for another message (id {recorded_id}); use a new key for a new message"
    )


class KeyTable:
    """Keys seen in this process, each remembered for `ttl` seconds (the memory layer's record)."""

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        # (channel, key) -> (id, fingerprint, expiry); insertion order is expiry order
        self._records: dict[tuple[str, str], tuple[str, str, float]] = {}

    def recall(self, messages: Sequence[Message]) -> dict[int, Replayed]:
        """The recorded ids of the keyed messages seen before, by index; `IdempotencyKeyReused`
        (and nothing to publish) when one of them was seen with another body."""
        found: dict[int, Replayed] = {}
        if not keyed(messages):
            return found
        self._expire()
        for index, message in enumerate(messages):
            if message.idempotency_key is None:
                continue
            record = self._records.get((message.channel, message.idempotency_key))
            if record is not None:
                if record[1] != fingerprint(message):
                    raise reused(message, record[0])
                found[index] = Replayed(record[0])
        return found

    def remember(self, message: Message, id: str) -> None:
        if message.idempotency_key is not None:
            self._records[message.channel, message.idempotency_key] = (
                id,
                fingerprint(message),
                time.monotonic() + self.ttl,
            )

    def _expire(self) -> None:
        now = time.monotonic()
        records = self._records
        while records:
            name = next(iter(records))
            if records[name][2] > now:
                break
            del records[name]

    def __len__(self) -> int:
        return len(self._records)
