"""A Server-Sent Events client for tests, following the WHATWG parsing rules to the letter.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class SSEEvent:
    type: str
    data: str
    last_event_id: str
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


class SSEParser:
    """Feed text chunks, get dispatched events; keeps `last_event_id` and `retry` like a browser."""

    def __init__(self) -> None:
        self.buffer = ""
        self.data: list[str] = []
        self.event_type = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []
        self._pending_cr = False

    def feed(self, text: str) -> list[SSEEvent]:
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = text.endswith("\r")
        self.buffer += text
        events: list[SSEEvent] = []
        for line in self._lines():
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self) -> Iterator[str]:
        while True:
            positions = [p for p in (self.buffer.find(c) for c in "\r\n") if p >= 0]
            if not positions:
                return
            end = min(positions)
            line = self.buffer[:end]
            skip = 2 if self.buffer[end : end + 2] == "\r\n" else 1
            self.buffer = self.buffer[end + skip :]
            yield line

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self.event_type = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self.data:
            self.event_type = ""
            return None
        event = SSEEvent(
            self.event_type or "message", "\n".join(self.data), self.last_event_id, self.comments
        )
        self.data, self.event_type, self.comments = [], "", []
        return event


def parse(text: str) -> list[SSEEvent]:
    return SSEParser().feed(text)


class SSEStream:
    """An open SSE response, read event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SSEParser()
        self._pending: list[SSEEvent] = []
        self._chunks = response.aiter_text()

    async def next(self) -> SSEEvent:
        while not self._pending:
            chunk = await self._chunks.__anext__()
            self._pending.extend(self.parser.feed(chunk))
        return self._pending.pop(0)

    async def take(self, count: int) -> list[SSEEvent]:
        return [await self.next() for _ in range(count)]

    async def __aiter__(self) -> AsyncIterator[SSEEvent]:
        while True:
            yield await self.next()


def data_of(events: Iterable[SSEEvent]) -> list[Any]:
    return [event.json["data"] for event in events]
