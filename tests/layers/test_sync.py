"""`layers.sync.SyncChannel` on every layer in `CONTRACT_LAYERS` (memory under asyncio and trio),
and a WSGI app publishing through it to a subscriber of a real gateway process.

The tests are plain sync code, as a sync user's would be; every blocking wait is bounded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import httpx
import pytest

from layers import (
    CapabilityNotSupported,
    ChannelClosed,
    ChannelObserver,
    Event,
    Gap,
    InvalidArgument,
    InvalidPayload,
    Item,
    LayerConfigurationError,
    LayerUnavailable,
    SubscriberOverflow,
)
from layers.sync import BlockingSubscription, SyncChannel
from tests.conftest import LayerFactory

TIMEOUT = 15.0

OpenSync = Callable[..., AbstractContextManager[SyncChannel]]


@pytest.fixture
def open_sync(make_layer: LayerFactory, layer_case: tuple[str, str]) -> OpenSync:
    """`with open_sync(history_size=5, max_backlog=10) as channel:`; checks that closing the
    `SyncChannel` left none of its threads (loop and handlers) behind."""

    @contextmanager
    def opener(**options: Any) -> Iterator[SyncChannel]:
        layer_options = {
            key: options.pop(key) for key in ("history_size", "history_ttl") if key in options
        }
        with SyncChannel(make_layer(**layer_options), backend=layer_case[1], **options) as channel:
            yield channel
        assert [t for t in threading.enumerate() if t.name.startswith("layers-sync-")] == []

    return opener


def take(subscription: BlockingSubscription, count: int) -> list[Item]:
    deadline = time.monotonic() + TIMEOUT
    return [subscription.receive(timeout=deadline - time.monotonic()) for _ in range(count)]


def events(subscription: BlockingSubscription, count: int) -> list[Event]:
    items = take(subscription, count)
    assert all(isinstance(item, Event) for item in items), items
    return [item for item in items if isinstance(item, Event)]


def wait_for(check: Callable[[], bool]) -> None:
    """Wait for state another thread changes (a handler's results), bounded."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def need(channel: SyncChannel, capability: str) -> None:
    if not getattr(channel.channel.capabilities, capability):
        pytest.skip(f"{channel.channel.layer.scheme}:// has no {capability} by design")


# -- publish and blocking subscriptions --


def test_published_event_is_received(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel, channel.subscribe(f"{unique}.room") as subscription:
        message_id = channel.publish(f"{unique}.room", {"text": "hi"}, event="chat")
        (event,) = events(subscription, 1)
    assert (event.channel, event.id, event.event, event.data) == (
        f"{unique}.room",
        message_id,
        "chat",
        {"text": "hi"},
    )


def test_publish_from_many_threads(open_sync: OpenSync, unique: str) -> None:
    ids: dict[int, list[str]] = {}

    def publisher(number: int) -> None:
        ids[number] = [channel.publish(unique, [number, n]) for n in range(25)]

    with open_sync() as channel, channel.subscribe(unique) as subscription:
        threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        received = events(subscription, 100)
        for thread in threads:
            thread.join(TIMEOUT)
    for number in range(4):
        mine = [event for event in received if event.data[0] == number]
        assert [event.data[1] for event in mine] == list(range(25))  # in order per publisher
        assert [event.id for event in mine] == ids[number]


def test_publish_nowait_is_flushed_in_order_and_on_close(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel, channel.subscribe(unique) as subscription:
        for n in range(5):
            channel.publish_nowait(unique, n)
        assert [event.data for event in events(subscription, 5)] == list(range(5))
    published: list[int] = []

    class Counting(ChannelObserver):
        def published(self, count: int, seconds: float) -> None:
            published.append(count)

    with open_sync(observer=Counting()) as channel:
        for n in range(5):
            channel.publish_nowait(unique, n)
        core = channel.channel
    assert (sum(published), core.publish_failures) == (5, 0)


def test_patterns_and_several_channels(open_sync: OpenSync, unique: str) -> None:
    with (
        open_sync() as channel,
        channel.subscribe(f"{unique}.a", patterns=[f"{unique}.rooms.*"]) as subscription,
    ):
        channel.publish(f"{unique}.b", "not mine")
        channel.publish(f"{unique}.a", 1)
        channel.publish(f"{unique}.rooms.x", 2)
        assert [event.data for event in events(subscription, 2)] == [1, 2]


def test_close_from_another_thread_ends_iteration(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel:
        subscription = channel.subscribe(unique)
        received: list[Item] = []
        got_three = threading.Event()

        def reader() -> None:
            for item in subscription:
                received.append(item)
                if len(received) == 3:
                    got_three.set()

        thread = threading.Thread(target=reader)
        thread.start()
        for n in range(3):
            channel.publish(unique, n)
        assert got_three.wait(TIMEOUT)
        subscription.close()  # the reader is blocked waiting for a fourth
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert [item.data for item in received if isinstance(item, Event)] == [0, 1, 2]
        assert channel.channel.subscriber_count == 0
        with pytest.raises(ChannelClosed):
            subscription.receive(timeout=1)
        subscription.close()  # idempotent


def test_leaving_the_with_block_closes_the_subscription(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel:
        with channel.subscribe(unique) as subscription:
            assert channel.channel.subscriber_count == 1
        assert subscription.closed
        assert channel.channel.subscriber_count == 0
        assert list(subscription) == []


def test_closing_the_sync_channel_ends_every_subscription_and_its_threads(
    make_layer: LayerFactory, layer_case: tuple[str, str], unique: str
) -> None:
    before = set(threading.enumerate())
    channel = SyncChannel(make_layer(), backend=layer_case[1]).open()
    blocking = channel.subscribe(unique)
    handled: list[object] = []
    handler = channel.subscribe(unique, handler=lambda event: handled.append(event.data))
    assert set(threading.enumerate()) - before  # the loop thread and the handler's
    received: list[object] = []
    outcome: list[object] = []

    def reader() -> None:
        try:
            for item in blocking:
                received.append(item.data if isinstance(item, Event) else item)
            outcome.append("ended")
        except BaseException as exc:  # the test wants to see any exception, not a clean end
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    channel.publish(unique, "last")
    wait_for(lambda: handled == ["last"] and received == ["last"])
    channel.close()
    thread.join(TIMEOUT)
    assert outcome == ["ended"]  # the blocked iteration ended cleanly
    assert blocking.closed
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ChannelClosed):
        channel.publish(unique, "after close")
    with pytest.raises(ChannelClosed):
        channel.subscribe(unique)
    channel.close()  # idempotent
    handler.close()


def test_a_channel_that_cannot_work_says_why_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    channel = SyncChannel("nope://")
    with pytest.raises(LayerConfigurationError):
        channel.open()
    with pytest.raises(ChannelClosed):
        channel.publish("a", 1)
    # The layer refuses to open, or opens and answers calls with the error until it connects.
    with pytest.raises(LayerUnavailable), SyncChannel("redis://127.0.0.1:1/0") as unreachable:
        unreachable.publish("a", 1)
    assert set(threading.enumerate()) - before == set()


def test_closing_while_threads_publish_and_read(
    make_layer: LayerFactory, layer_case: tuple[str, str], unique: str
) -> None:
    """Publishers racing the close get `ChannelClosed`, readers a clean end, and nothing else."""
    before = set(threading.enumerate())
    channel = SyncChannel(make_layer(), backend=layer_case[1]).open()
    subscriptions = [channel.subscribe(unique) for _ in range(2)]
    outcomes: list[object] = []
    started = threading.Barrier(7)

    def publisher() -> None:
        started.wait(TIMEOUT)
        try:
            while True:
                channel.publish(unique, "x")
        except ChannelClosed:
            outcomes.append("publisher closed")
        except BaseException as exc:  # the test wants to see any other exception
            outcomes.append(exc)

    def reader(subscription: BlockingSubscription) -> None:
        started.wait(TIMEOUT)
        try:
            for _ in subscription:
                pass
            outcomes.append("reader ended")
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=publisher) for _ in range(4)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in subscriptions]
    for thread in threads:
        thread.start()
    started.wait(TIMEOUT)
    time.sleep(0.2)  # let them run into each other for a while
    channel.close()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(map(str, outcomes)) == ["publisher closed"] * 4 + ["reader ended"] * 2
    assert set(threading.enumerate()) - before == set()


def test_receive_timeout_leaves_the_subscription_usable(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel, channel.subscribe(unique) as subscription:
        with pytest.raises(TimeoutError):
            subscription.receive(timeout=0.05)
        channel.publish(unique, "later")
        assert [event.data for event in events(subscription, 1)] == ["later"]


def test_errors_reach_the_calling_thread(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel:
        with pytest.raises(InvalidArgument):
            channel.publish("bad name!", 1)
        with pytest.raises(InvalidPayload):
            channel.publish(unique, {1, 2})
        with pytest.raises(InvalidArgument):
            channel.subscribe(patterns=["a..*"])
        assert channel.channel.subscriber_count == 0
        channel.ping()


def test_disconnect_policy_ends_a_reader_that_fell_behind(open_sync: OpenSync, unique: str) -> None:
    with (
        open_sync() as channel,
        channel.subscribe(unique, max_backlog=2, backlog_policy="disconnect") as subscription,
    ):
        for n in range(3):
            channel.publish(unique, n)
        wait_for(lambda: subscription.subscription.dropped == 1)
        with pytest.raises(SubscriberOverflow):
            take(subscription, 3)


# -- handlers --


def test_handler_gets_every_event_in_order_in_a_worker_thread(
    open_sync: OpenSync, unique: str
) -> None:
    seen: list[tuple[object, str]] = []
    with open_sync() as channel:
        with channel.subscribe(
            unique, handler=lambda event: seen.append((event.data, threading.current_thread().name))
        ) as handler:
            for n in range(50):
                channel.publish(unique, n)
            wait_for(lambda: len(seen) == 50)
        assert handler.handled == 50
    assert [data for data, _ in seen] == list(range(50))
    (thread_name,) = {name for _, name in seen}
    assert thread_name.startswith("layers-sync-handler-")


def test_closing_a_handler_handles_what_was_delivered_first(
    open_sync: OpenSync, unique: str
) -> None:
    gate = threading.Event()
    handled: list[object] = []

    def slow(event: Event) -> None:
        gate.wait(TIMEOUT)
        handled.append(event.data)

    with open_sync() as channel, channel.subscribe(unique) as witness:
        handler = channel.subscribe(unique, handler=slow)
        for n in range(10):
            channel.publish(unique, n)
        events(witness, 10)  # all ten reached this process, so the handler's backlog too
        gate.set()
        handler.close()
        assert handled == list(range(10))
        channel.publish(unique, "after close")
        events(witness, 1)
    assert handled == list(range(10))


def test_handlers_finish_their_events_and_may_publish_while_the_channel_closes(
    open_sync: OpenSync, unique: str
) -> None:
    gate = threading.Event()
    published: list[int] = []

    class Counting(ChannelObserver):
        def published(self, count: int, seconds: float) -> None:
            published.append(count)

    with open_sync(observer=Counting()) as channel:

        def echo(event: Event) -> None:
            gate.wait(TIMEOUT)
            channel.publish(f"{unique}.echo", event.data)

        handler = channel.subscribe(unique, handler=echo)
        with channel.subscribe(unique) as witness:
            for n in range(5):
                channel.publish(unique, n)
            events(witness, 5)  # delivered to this process, so to the handler too
        opener = threading.Timer(0.2, gate.set)  # the handler goes on while the channel closes
        opener.start()
    opener.join()
    assert (handler.handled, handler.errors, sum(published)) == (5, 0, 10)


def test_failing_handler_is_logged_and_counted_and_nothing_else_stops(
    open_sync: OpenSync, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    steady: list[object] = []
    flaky_ok: list[object] = []

    def flaky(event: Event) -> None:
        if event.data % 2:
            raise RuntimeError(f"odd {event.data}")
        flaky_ok.append(event.data)

    with caplog.at_level(logging.ERROR, logger="layers.sync"), open_sync() as channel:
        failing = channel.subscribe(unique, handler=flaky)
        channel.subscribe(unique, handler=lambda event: steady.append(event.data))
        for n in range(10):
            channel.publish(unique, n)
        wait_for(lambda: len(steady) == 10 and failing.errors + failing.handled == 10)
        assert flaky_ok == [0, 2, 4, 6, 8]  # the failing handler's own subscription went on
        assert (failing.errors, channel.handler_errors) == (5, 5)
        channel.publish(unique, 10)  # the channel still works
        wait_for(lambda: steady[-1:] == [10])
    failures = [r for r in caplog.records if r.name == "layers.sync" and r.exc_info]
    assert len(failures) == 5
    assert "flaky" in failures[0].getMessage()


def test_handler_may_publish_and_close_its_own_subscription(
    open_sync: OpenSync, unique: str
) -> None:
    with open_sync() as channel, channel.subscribe(f"{unique}.echo") as echoes:

        def echo_once(event: Event) -> None:
            channel.publish(f"{unique}.echo", event.data)
            subscription.close()

        subscription = channel.subscribe(unique, handler=echo_once)
        channel.publish(unique, "ping")
        assert [event.data for event in events(echoes, 1)] == ["ping"]
        wait_for(lambda: not subscription._thread.is_alive())
        channel.publish(unique, "not handled")
        assert subscription.handled == 1


def test_handler_may_close_the_sync_channel(
    make_layer: LayerFactory, layer_case: tuple[str, str], unique: str
) -> None:
    before = set(threading.enumerate())
    channel = SyncChannel(make_layer(), backend=layer_case[1]).open()
    handler = channel.subscribe(unique, handler=lambda event: channel.close())
    channel.publish(unique, "stop")
    wait_for(lambda: not handler._thread.is_alive())
    assert handler.errors == 0
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ChannelClosed):
        channel.publish(unique, "closed")


# -- history and groups --


def test_history_and_resume(open_sync: OpenSync, unique: str) -> None:
    with open_sync(history_size=10) as channel:
        if not channel.channel.capabilities.history:
            with pytest.raises(CapabilityNotSupported):
                channel.history(unique)
            with pytest.raises(CapabilityNotSupported):
                channel.subscribe(unique, history=2)
            with channel.subscribe(unique, last_event_id="0-0") as subscription:
                (gap,) = take(subscription, 1)
                assert isinstance(gap, Gap) and gap.reason == "no_history"
            return
        ids = [channel.publish(unique, n) for n in range(3)]
        assert [event.data for event in channel.history(unique).events] == [0, 1, 2]
        assert [event.id for event in channel.history(unique, after=ids[0]).events] == ids[1:]
        with channel.subscribe(unique, last_event_id=ids[0]) as subscription:
            channel.publish(unique, 3)
            assert [event.data for event in events(subscription, 3)] == [1, 2, 3]
        with channel.subscribe(unique, history=2) as subscription:
            assert [event.data for event in events(subscription, 2)] == [2, 3]


def test_group_blocking_consumer_acks(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel:
        need(channel, "groups")
        with channel.subscribe(unique, group="g", consumer="c") as subscription:
            ids = [channel.publish(unique, n) for n in range(2)]
            received = events(subscription, 2)
            assert [event.group for event in received] == ["g", "g"]
            acked, unknown = channel.ack(unique, "g", [*ids, "0-1"])
        assert (sorted(acked), unknown) == (sorted(ids), ["0-1"])
        assert channel.group_info(unique, "g").pending == 0


def test_group_handler_acks_on_return_and_redelivers_after_an_exception(
    open_sync: OpenSync, unique: str
) -> None:
    deliveries: list[tuple[object, int | None]] = []

    def worker(event: Event) -> None:
        deliveries.append((event.data, event.deliveries))
        if event.data == "fails once" and event.deliveries == 1:
            raise RuntimeError("transient")

    with open_sync(ack_timeout=0.5) as channel:
        need(channel, "groups")
        with channel.subscribe(unique, group="workers", consumer="w1", handler=worker) as handler:
            channel.publish(unique, "fine")
            channel.publish(unique, "fails once")
            wait_for(lambda: ("fails once", 2) in deliveries)
            wait_for(lambda: channel.group_info(unique, "workers").pending == 0)
        assert ("fine", 1) in deliveries
        assert ("fine", 2) not in deliveries  # acked when the handler returned
        assert (handler.errors, handler.handled) == (1, 2)


def test_closing_a_group_handler_acks_the_event_in_hand(open_sync: OpenSync, unique: str) -> None:
    gate = threading.Event()
    started = threading.Event()

    def worker(event: Event) -> None:
        started.set()
        gate.wait(TIMEOUT)

    with open_sync() as channel:
        need(channel, "groups")
        handler = channel.subscribe(unique, group="g", consumer="c", handler=worker)
        channel.publish(unique, "job")
        assert started.wait(TIMEOUT)
        threading.Timer(0.1, gate.set).start()  # the job ends while the handler is closing
        handler.close()
        assert (handler.handled, handler.errors) == (1, 0)
        assert channel.group_info(unique, "g").pending == 0


# -- under a WSGI app, beside a gateway process --


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Any) -> Iterator[str]:
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_wsgi_app_publishes_to_a_gateway_subscriber(
    redis_url: str, redis_prefix: str, unique: str, tmp_path: Path
) -> None:
    """A WSGI view publishes through a `SyncChannel` on redis+streams://; an SSE client of a
    gateway process on the same Redis receives it, under the id the view answered."""
    from tests.app.processes import gateway_process

    layer_url = redis_url.replace("redis://", "redis+streams://", 1) + f"?key_prefix={redis_prefix}"
    topic = f"{unique}.orders"

    with SyncChannel(layer_url) as channel:

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            order = json.loads(environ["wsgi.input"].read(size))
            message_id = channel.publish(topic, order, event="order")
            start_response("201 Created", [("Content-Type", "application/json")])
            return [json.dumps({"id": message_id}).encode()]

        with (
            wsgi_server(app) as wsgi_url,
            gateway_process(layer_url, tmp_path / "gateway.log") as gateway,
        ):
            await gateway.wait_ready()
            async with gateway.sse(f"/channels/{topic}/events") as sse:
                with anyio.fail_after(TIMEOUT):
                    async with httpx.AsyncClient(base_url=wsgi_url, timeout=TIMEOUT) as http:
                        reply = await http.post("/orders", json={"order": 42})
                    assert reply.status_code == 201, reply.text
                    event = await sse.next()
    assert event.type == "order"
    assert event.last_event_id == reply.json()["id"]
    assert event.json["channel"] == topic
    assert event.json["data"] == {"order": 42}


def test_publish_pattern_from_a_thread(open_sync: OpenSync, unique: str) -> None:
    with open_sync() as channel, channel.subscribe(f"{unique}.a", f"{unique}.b") as subscription:
        message_id = channel.publish_pattern(f"{unique}.*", "to all", event="news")
        (event,) = events(subscription, 1)
    assert (event.channel, event.id, event.event, event.data) == (
        f"{unique}.*",
        message_id,
        "news",
        "to all",
    )
