"""Authorization with JSON Web Tokens, through a real server: HTTP routes, SSE and WebSocket."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import anyio
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import RunningGateway, serve
from tests.app.test_ws import receive, request
from tests.test_readme import README

pytestmark = pytest.mark.anyio

SECRET = "test-secret-of-at-least-32-bytes!"


def token(
    key: Any = SECRET,
    algorithm: str = "HS256",
    *,
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    groups: list[str] | None = None,
    any_consumer: bool | None = None,
    ttl: float = 60,
    **claims: Any,
) -> str:
    channels: dict[str, Any] = {"publish": publish or [], "subscribe": subscribe or []}
    if groups is not None:
        channels["groups"] = groups
    if any_consumer is not None:
        channels["any_consumer"] = any_consumer
    payload = {"exp": int(time.time() + ttl), "channels": channels, **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def secured() -> Iterator[RunningGateway]:
    with serve(jwt_secret=SECRET, keepalive_seconds=0.5) as running:
        yield running


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token PyJWT refuses to make: `alg: none`, or HS256 keyed with a public key."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


async def test_authorization_is_off_by_default_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app"), serve() as gateway:
        async with gateway.client() as http:
            reply = await http.post("/channels/any/publish", json={"data": 1})
            assert reply.status_code == 200
    assert any("authorization is off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"), serve(jwt_secret=SECRET):
        pass
    assert not any("authorization is off" in r.getMessage() for r in caplog.records)


async def test_every_route_needs_a_token(secured: RunningGateway) -> None:
    async with secured.client() as http:
        replies = [
            await http.post("/channels/c/publish", json={"data": 1}),
            await http.post("/publish", json={"messages": [{"channel": "c", "data": 1}]}),
            await http.get("/channels/c/events"),
            await http.get("/events", params={"pattern": "c.*"}),
            await http.get("/channels/c/history"),
            await http.post("/channels/c/groups/g/ack", json={"ids": []}),
            await http.get("/channels/c/groups/g"),
        ]
        assert (await http.get("/healthz")).status_code == 200
    for reply in replies:
        assert reply.status_code == 401, reply.request.url
        assert reply.json()["error"] == "token_required"


async def test_publish_rights_are_globs(secured: RunningGateway) -> None:
    headers = bearer(token(publish=["chat.*"]))
    async with secured.client(headers=headers) as http:
        assert (await http.post("/channels/chat.room/publish", json={"data": 1})).status_code == 200
        denied = await http.post("/channels/news/publish", json={"data": 1})
        assert denied.status_code == 403
        assert denied.json()["error"] == "forbidden"
        batch = await http.post(
            "/publish",
            json={"messages": [{"channel": "chat.a", "data": 1}, {"channel": "news", "data": 2}]},
        )
        assert batch.status_code == 403
        assert batch.json()["detail"].startswith("messages[1]:")
        # a publish right is not a subscribe right
        assert (await http.get("/channels/chat.room/history")).status_code == 403


async def test_subscribe_rights_and_pattern_escalation(secured: RunningGateway) -> None:
    headers = bearer(token(subscribe=["chat.*"]))
    async with secured.client(headers=headers) as http:
        escalation = await http.get("/events", params={"pattern": "*"})
        assert escalation.status_code == 403
        assert "pattern '*'" in escalation.json()["detail"]
        for wider in ("chat*", "chat?x", "*.chat.*", "?hat.*"):
            assert (await http.get("/events", params={"pattern": wider})).status_code == 403
        assert (
            await http.get("/events", params={"channel": ["chat.a", "news"]})
        ).status_code == 403
        assert (await http.get("/channels/chat/events")).status_code == 403  # `chat.*` needs a dot
        assert (await http.get("/channels/chat.a/history")).status_code == 200
        assert (await http.post("/channels/chat.a/publish", json={"data": 1})).status_code == 403
    publisher = bearer(token(publish=["*"]))
    async with (
        secured.client() as http,
        secured.sse("/events?pattern=chat.room.*&channel=chat.b", headers=headers) as stream,
    ):
        for channel in ("chat.room.1", "news", "chat.b"):
            reply = await http.post(
                f"/channels/{channel}/publish", json={"data": channel}, headers=publisher
            )
            assert reply.status_code == 200
        with anyio.fail_after(10):
            received = [(await stream.next()).json["data"] for _ in range(2)]
    assert received == ["chat.room.1", "chat.b"]


async def test_group_acks_and_reads_need_group_rights(secured: RunningGateway) -> None:
    allowed = bearer(token(groups=["jobs"]))
    other = bearer(token(subscribe=["jobs"], groups=["mail"], publish=["*"]))
    async with secured.client() as http:
        ack = {"ids": ["x"]}
        assert (
            await http.post("/channels/jobs/groups/g/ack", json=ack, headers=other)
        ).status_code == 403
        assert (await http.get("/channels/jobs/groups/g", headers=other)).status_code == 403
        reply = await http.post("/channels/jobs/groups/g/ack", json=ack, headers=allowed)
        assert reply.status_code in (200, 404)  # the group may not exist: not a refusal
        assert reply.status_code != 403


@pytest.mark.parametrize(
    ("make", "error"),
    [
        pytest.param(
            lambda: token(key="another-secret-of-at-least-32-bytes"),
            "invalid_token",
            id="wrong-key",
        ),
        pytest.param(lambda: token(ttl=-10), "token_expired", id="expired"),
        pytest.param(
            lambda: hand_signed(
                {"alg": "none", "typ": "JWT"},
                {"exp": time.time() + 60, "channels": {"publish": ["*"]}},
                None,
            ),
            "invalid_token",
            id="alg-none",
        ),
        pytest.param(
            lambda: jwt.encode({"channels": {"publish": ["*"]}}, SECRET, algorithm="HS256"),
            "invalid_token",
            id="no-exp",
        ),
        pytest.param(lambda: token(publish=["bad name!"]), "invalid_token", id="bad-glob"),
        pytest.param(lambda: "not.a.token", "invalid_token", id="garbage"),
    ],
)
async def test_bad_tokens_are_401(secured: RunningGateway, make: Any, error: str) -> None:
    async with secured.client() as http:
        reply = await http.post("/channels/c/publish", json={"data": 1}, headers=bearer(make()))
    assert reply.status_code == 401
    assert reply.json()["error"] == error


async def test_audience_and_issuer_are_required_when_configured() -> None:
    with serve(
        jwt_secret=SECRET, jwt_audience="gateway", jwt_issuer="https://auth.example"
    ) as gateway:
        async with gateway.client() as http:

            async def status(**claims: Any) -> int:
                reply = await http.post(
                    "/channels/c/publish",
                    json={"data": 1},
                    headers=bearer(token(publish=["*"], **claims)),
                )
                return reply.status_code

            assert await status(aud="gateway", iss="https://auth.example") == 200
            assert await status(aud="other", iss="https://auth.example") == 401
            assert await status(iss="https://auth.example") == 401
            assert await status(aud="gateway", iss="https://evil.example") == 401
            assert await status(aud="gateway") == 401


async def test_token_from_query_parameter_and_cookie(secured: RunningGateway) -> None:
    value = token(subscribe=["*"], publish=["*"])
    async with secured.sse(f"/channels/c/events?access_token={value}"):
        pass
    async with secured.client(cookies={"access_token": value}) as http:
        assert (await http.post("/channels/c/publish", json={"data": 1})).status_code == 200
        same_site = {"Origin": secured.url}
        assert (
            await http.post("/channels/c/publish", json={"data": 1}, headers=same_site)
        ).status_code == 200
        # another site's page must not publish or subscribe with this user's cookie
        cross_site = {"Origin": "https://evil.example"}
        forged = await http.post("/channels/c/publish", json={"data": 1}, headers=cross_site)
        assert forged.status_code == 401
        assert (await http.get("/channels/c/history", headers=cross_site)).status_code == 401
        # an explicit token is the caller's own, whatever the origin
        explicit = await http.post(
            "/channels/c/publish", json={"data": 1}, headers={**cross_site, **bearer(value)}
        )
        assert explicit.status_code == 200


async def test_cookie_from_a_cors_origin_and_a_custom_cookie_name() -> None:
    value = token(publish=["*"])
    with serve(jwt_secret=SECRET, jwt_cookie="gw", cors_origins="https://app.example") as gateway:
        async with gateway.client(cookies={"gw": value}) as http:
            reply = await http.post(
                "/channels/c/publish", json={"data": 1}, headers={"Origin": "https://app.example"}
            )
            assert reply.status_code == 200
            assert reply.headers["access-control-allow-origin"] == "https://app.example"
            assert reply.headers["access-control-allow-credentials"] == "true"


async def test_anonymous_subscribe_keeps_publish_protected() -> None:
    with serve(jwt_secret=SECRET, anonymous_subscribe=True) as gateway:
        async with gateway.client() as http, gateway.sse("/events?pattern=*"):
            anonymous = await http.post("/channels/c/publish", json={"data": 1})
            assert anonymous.status_code == 401
            assert anonymous.json()["error"] == "token_required"
            without_right = await http.post(
                "/channels/c/publish", json={"data": 1}, headers=bearer(token(publish=["d"]))
            )
            assert without_right.status_code == 403
            # a bad token is refused even where no token is needed
            bad = await http.get("/channels/c/history", headers=bearer("not.a.token"))
            assert bad.status_code == 401


async def test_sse_stream_ends_when_its_token_expires(secured: RunningGateway) -> None:
    reader = token(subscribe=["c"], ttl=2)
    async with (
        secured.client(headers=bearer(token(publish=["c"]))) as http,
        secured.sse("/channels/c/events", headers=bearer(reader)) as stream,
    ):
        with anyio.fail_after(10):
            await http.post("/channels/c/publish", json={"data": "before"})
            assert (await stream.next()).json["data"] == "before"
            ending = await stream.next()
            assert ending.type == "error"
            assert ending.json["error"] == "token_expired"
            with pytest.raises(StopAsyncIteration):
                await stream.next()


async def test_rs256_and_es256_keys(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for key, algorithm, stranger in (
        (rsa_key, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        (ec_key, "ES256", ec.generate_private_key(ec.SECP256R1())),
    ):
        pem = public_pem(key)
        with serve(jwt_public_key=pem) as gateway:
            async with gateway.client() as http:

                async def status(value: str) -> int:
                    reply = await http.post(
                        "/channels/c/publish", json={"data": 1}, headers=bearer(value)
                    )
                    return reply.status_code

                assert await status(token(key, algorithm, publish=["*"])) == 200
                assert await status(token(stranger, algorithm, publish=["*"])) == 401
                assert await status(token(SECRET, publish=["*"])) == 401
                # the public key used as an HMAC secret: the classic algorithm confusion
                confused = hand_signed(
                    {"alg": "HS256", "typ": "JWT"},
                    {"exp": time.time() + 60, "channels": {"publish": ["*"]}},
                    pem.encode(),
                )
                assert await status(confused) == 401


def test_key_settings_are_checked_at_start(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(jwt_secret="short")
    with pytest.raises(ValidationError, match="not both"):
        Settings(jwt_secret=SECRET, jwt_public_key=public_pem(ec_key))
    with pytest.raises(ValueError, match="not a PEM public key"):
        create_app(Settings(jwt_public_key="-----BEGIN PUBLIC KEY-----\nxyz"))
    small = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        create_app(Settings(jwt_public_key=public_pem(small)))
    assert Settings(jwt_secret="").jwt_secret is None


async def test_cors_credentials() -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with serve(cors_origins="https://app.example") as gateway:
        async with gateway.client() as http:
            allowed = await http.options(
                "/channels/c/publish", headers={"Origin": "https://app.example", **preflight}
            )
            assert allowed.status_code == 200
            assert allowed.headers["access-control-allow-origin"] == "https://app.example"
            assert allowed.headers["access-control-allow-credentials"] == "true"
            assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
            foreign = await http.options(
                "/channels/c/publish", headers={"Origin": "https://evil.example", **preflight}
            )
            assert foreign.status_code == 400
            assert "access-control-allow-origin" not in foreign.headers
    # any origin: browsers then send no cookies, and the gateway must not ask them to
    with serve(cors_origins="*") as gateway:
        async with gateway.client() as http:
            reply = await http.get("/healthz", headers={"Origin": "https://any.example"})
            assert reply.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in reply.headers


# -- WebSocket ---------------------------------------------------------------------------------


async def test_websocket_handshake_with_a_bad_token_is_closed_1008(
    secured: RunningGateway,
) -> None:
    async with connect(secured.ws_url, additional_headers=bearer("not.a.token")) as ws:
        frame = await receive(ws)
        assert (frame["type"], frame["error"], frame["status"]) == ("error", "invalid_token", 401)
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


async def test_websocket_handshake_without_a_token_is_closed_1008(
    secured: RunningGateway,
) -> None:
    async with connect(secured.ws_url) as ws:
        frame = await receive(ws)
        assert (frame["error"], frame["status"]) == ("token_required", 401)
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


async def test_websocket_anonymous_subscribe() -> None:
    with serve(jwt_secret=SECRET, anonymous_subscribe=True) as gateway:
        async with connect(gateway.ws_url) as ws:
            assert (await request(ws, op="subscribe", channels=["c"]))["type"] == "ok"
            refused = await request(ws, op="publish", channel="c", data=1, ref=2)
            assert (refused["error"], refused["status"]) == ("token_required", 401)


async def test_websocket_ops_follow_the_grant(secured: RunningGateway) -> None:
    value = token(subscribe=["chat.*"], publish=["chat.mine"])
    async with connect(f"{secured.ws_url}?access_token={value}") as ws:
        escalation = await request(ws, op="subscribe", patterns=["*"], ref=1)
        assert (escalation["type"], escalation["status"]) == ("error", 403)
        ok = await request(ws, op="subscribe", patterns=["chat.*"], ref=2)
        assert ok["type"] == "ok"
        denied = await request(ws, op="publish", channel="chat.other", data=1, ref=3)
        assert (denied["error"], denied["status"]) == ("forbidden", 403)
        no_ack = await request(ws, op="ack", channel="jobs", group="g", ids=["x"], ref=4)
        assert no_ack["status"] == 403
        no_join = await request(ws, op="subscribe", channels=["chat.x"], group="g", ref=6)
        assert (no_join["error"], no_join["status"]) == ("forbidden", 403)
        published = await request(ws, op="publish", channel="chat.mine", data="hi", ref=5)
        assert published["type"] == "ok"
        message = await receive(ws)
        assert (message["type"], message["data"]) == ("message", "hi")


async def test_websocket_closes_when_its_token_expires(secured: RunningGateway) -> None:
    value = token(subscribe=["c"], ttl=2)
    async with connect(secured.ws_url, additional_headers=bearer(value)) as ws:
        assert (await request(ws, op="subscribe", channels=["c"]))["type"] == "ok"
        frame = await receive(ws)
        assert (frame["type"], frame["error"]) == ("error", "token_expired")
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


async def test_websocket_cookie_from_another_site_is_ignored(secured: RunningGateway) -> None:
    value = token(subscribe=["*"])
    cookie = {"Cookie": f"access_token={value}"}
    async with connect(
        secured.ws_url, additional_headers={**cookie, "Origin": "https://evil.example"}
    ) as ws:
        refused = await receive(ws)
        assert refused["error"] == "token_required"
    async with connect(secured.ws_url, additional_headers={**cookie, "Origin": secured.url}) as ws:
        assert (await request(ws, op="subscribe", channels=["c"]))["type"] == "ok"


async def test_joining_a_group_needs_the_group_right_and_a_consumer_name_of_ones_own(
    secured: RunningGateway,
) -> None:
    alice = bearer(token(groups=["jobs"], sub="alice"))
    async with secured.client() as http:
        refusals = {
            "subscribe right only": (token(subscribe=["jobs"], sub="alice"), "alice"),
            "another's name": (token(groups=["jobs"], sub="alice"), "bob"),
            "a name that only starts like sub": (token(groups=["jobs"], sub="alice"), "alicex"),
            "no sub, a name": (token(groups=["jobs"]), "w1"),
            "another channel's groups": (token(groups=["mail"], sub="alice"), "alice"),
        }
        for why, (value, consumer) in refusals.items():
            refused = await http.get(
                f"/channels/jobs/events?group=g&consumer={consumer}", headers=bearer(value)
            )
            assert (refused.status_code, refused.json()["error"]) == (403, "forbidden"), why
        anonymous = await http.get("/channels/jobs/events?group=g")
        assert anonymous.status_code == 401
    allowed = [
        ("alice", alice),
        ("alice:tab-2", alice),
        ("bob", bearer(token(groups=["jobs"], any_consumer=True))),
        ("", bearer(token(groups=["jobs"]))),  # a generated name needs no sub
    ]
    for consumer, headers in allowed:
        query = f"&consumer={consumer}" if consumer else ""
        async with secured.sse(f"/channels/jobs/events?group=g{query}", headers=headers):
            pass
    async with connect(secured.ws_url, additional_headers=alice) as ws:
        bob = await request(ws, op="subscribe", channels=["jobs"], group="g", consumer="bob")
        assert (bob["error"], bob["status"]) == ("forbidden", 403)
        mine = await request(ws, op="subscribe", channels=["jobs"], group="g", consumer="alice")
        assert mine["type"] == "ok"
        acked = await request(ws, op="ack", channel="jobs", group="g", ids=["0-1"])
        assert acked["type"] == "ok"


async def test_group_state_needs_the_group_right(secured: RunningGateway) -> None:
    async with secured.client() as http:
        reader = bearer(token(subscribe=["jobs"]))
        assert (await http.get("/channels/jobs/groups/g", headers=reader)).status_code == 403
        consumer = bearer(token(groups=["jobs"]))
        assert (await http.get("/channels/jobs/groups/g", headers=consumer)).status_code == 404


async def test_the_routes_the_readme_says_need_no_token_answer_without_one(
    secured: RunningGateway,
) -> None:
    text = " ".join(README.read_text().split())
    listed = re.search(r"((?:`/[a-z.]*`(?:,| and)? )+)need no token", text)
    assert listed is not None
    paths = re.findall(r"`(/[a-z.]*)`", listed.group(1))
    assert "/healthz" in paths
    async with secured.client() as http:
        for path in paths:
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/stats")).status_code == 401  # the README says it needs one
