"""`/metrics`: the counters an operator alerts on, fed by the routes and the channel's observer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import RunningGateway, free_port, serve
from tests.app.processes import running, wait_serving

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[str, float]:
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(gateway: RunningGateway) -> dict[str, float]:
    async with gateway.client() as http:
        response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_group_redeliveries_dead_letters_and_publish_latency_are_counted() -> None:
    with serve(ack_timeout_seconds=0.3, max_deliveries=2) as gateway:
        layer = [("layer", "memory")]
        async with (
            gateway.sse("/channels/jobs.dead/events") as dead,
            gateway.sse("/channels/jobs/events?group=g&consumer=c") as stream,
        ):
            async with gateway.client() as http:
                await http.post("/channels/jobs/publish", json={"data": "never acked"})
            with anyio.fail_after(10):
                first, second = await stream.take(2)
                await dead.next()  # the third claim dead-letters it
            assert (first.json["deliveries"], second.json["deliveries"]) == (1, 2)
            metrics = await scrape(gateway)
            assert metrics["gateway_subscribers_active" + str([*layer, ("transport", "sse")])] == 2
        metrics = await scrape(gateway)
    assert metrics["gateway_messages_published_total" + str(layer)] == 1
    assert metrics["gateway_publish_latency_seconds_count" + str(layer)] == 1
    assert metrics["gateway_messages_redelivered_total" + str(layer)] == 1
    assert metrics["gateway_messages_dead_lettered_total" + str(layer)] == 1
    # two deliveries of the message, then the dead letter on the other stream
    assert metrics["gateway_messages_delivered_total" + str([*layer, ("transport", "sse")])] == 3
    assert metrics["gateway_layer_errors_total" + str(layer)] == 0
    assert metrics["gateway_layer_reconnects_total" + str(layer)] == 0


IDLE_SERIES = [
    *(
        (name, {"layer": "memory", "transport": transport})
        for name in (
            "gateway_messages_delivered_total",
            "gateway_messages_dropped_total",
            "gateway_subscribers_active",
        )
        for transport in ("sse", "ws")
    ),
    *(
        (name, {"layer": "memory"})
        for name in (
            "gateway_messages_published_total",
            "gateway_publish_latency_seconds_count",
            "gateway_messages_redelivered_total",
            "gateway_messages_dead_lettered_total",
            "gateway_layer_errors_total",
            "gateway_layer_reconnects_total",
        )
    ),
]


def assert_every_series_at_zero(text: str) -> None:
    found = samples(text)
    for name, labels in IDLE_SERIES:
        key = name + str(sorted(labels.items()))
        assert found.get(key) == 0, f"{key} missing or not zero"


async def test_every_series_exists_at_zero_on_an_idle_gateway(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        assert_every_series_at_zero((await http.get("/metrics")).text)


@pytest.mark.parametrize(
    "argv",
    [["-m", "app"], ["-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:app"]],
    ids=["python-m-app", "gunicorn-multiprocess"],
)
async def test_every_series_exists_at_zero_from_start_up(argv: list[str], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_LAYER": "memory://"}
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, *argv], log, env) as process:
        await wait_serving(url, process, log)
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            response = await http.get("/metrics")
    assert_every_series_at_zero(response.text)
