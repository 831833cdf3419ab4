"""`/metrics`: the counters an operator alerts on, fed by the routes and the channel's observer."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import RunningGateway, serve

pytestmark = pytest.mark.anyio


async def scrape(gateway: RunningGateway) -> dict[str, float]:
    async with gateway.client() as http:
        response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


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
