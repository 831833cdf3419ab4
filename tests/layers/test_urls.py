"""Layer URLs are shown with every secret masked (`layers.urls.redact`)."""

from __future__ import annotations

import pytest

from layers import LayerConfigurationError, create_layer
from layers.urls import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://h/0?password=s3cret&key_prefix=gw:", "redis://h/0?password=***&key_prefix=gw:"),
        ("rediss://u:p%40ss@h/0?ssl_keyfile=/k.pem", "rediss://u:***@h/0?ssl_keyfile=***"),
        (
            "postgresql://u@h/db?sslkey=/k&sslpassword=q&application_name=gw",
            "postgresql://u@h/db?sslkey=***&sslpassword=***&application_name=gw",
        ),
        ("postgresql://u:pw@h1,h2:5433/db", "postgresql://u:***@h1,h2:5433/db"),
        ("mqtts://h?token=abc&topic_prefix=gw/", "mqtts://h?token=***&topic_prefix=gw/"),
        ("nats://t0ken@h:4222", "nats://***@h:4222"),
        ("redis://h/0?auth=x&access_token=y", "redis://h/0?auth=***&access_token=***"),
        ("memory://", "memory://"),
    ],
)
def test_secrets_are_masked(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_errors_naming_a_url_mask_its_secrets() -> None:
    with pytest.raises(LayerConfigurationError) as unknown:
        create_layer("nosuch://u:s3cret@h/?password=s3cret")
    with pytest.raises(LayerConfigurationError) as bad_port:
        create_layer("mqtt://u:s3cret@h:port")
    for raised in (unknown, bad_port):
        assert "s3cret" not in raised.value.detail
        assert "***" in raised.value.detail


@pytest.mark.parametrize(
    "url",
    [
        "redis://h/0?key_prefx=gw:",
        "redis+streams://h/0?histroy_size=5",
        "mqtt://h:1883?topic_prefx=gw/",
        "nats://h:4222?subject_prefx=gw",
    ],
)
def test_unknown_url_options_are_refused_naming_the_known_ones(url: str) -> None:
    with pytest.raises(LayerConfigurationError) as refused:
        create_layer(url)
    option = url.rpartition("?")[2].partition("=")[0]
    assert f"unknown {url.partition(':')[0]}:// URL option {option}; use " in refused.value.detail
    known = {"redis": "key_prefix", "mqtt": "topic_prefix", "nats": "subject_prefix"}
    assert known[url.partition(":")[0].partition("+")[0]] in refused.value.detail
