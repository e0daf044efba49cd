"""Browser safety: which pages may open a WebSocket (Origin), which may read REST answers
(CORS), and the security headers on every response relayd sends, over real loopback sockets."""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trustme

from .support import (
    IO_DEADLINE,
    HttpClient,
    HttpResponse,
    RunningRelayd,
    _exchange,
    make_config,
    start_relayd,
)
from .test_rest import assert_error
from .test_tls import tls_files
from .ws_support import connect_url

TRANSPORTS = ["main", "dedicated"]
APP = "https://app.example"
EVIL = "https://evil.example"
ALICE = "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


async def start(
    nursery: trio.Nursery, tmp_path: Path, transport: str = "main", **sections: Any
) -> RunningRelayd:
    overrides: dict[str, Any] = {k: dict(v) for k, v in sections.items()}
    if transport == "dedicated":
        overrides.setdefault("websocket", {})["listen"] = "127.0.0.1:0"
    return await start_relayd(nursery, make_config(tmp_path, overrides))


def ws_address(relayd: RunningRelayd) -> tuple[str, int]:
    return relayd.addresses.websocket or relayd.addresses.http


async def handshake(
    address: tuple[str, int], *, path: str = "/ws", origin: str | None = None
) -> HttpResponse:
    """A WebSocket upgrade request over a raw socket; the answer (101 has no body)."""
    headers = [
        ("Host", "relayd"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
        ("Sec-WebSocket-Version", "13"),
    ]
    if origin is not None:
        headers.append(("Origin", origin))
    conn = h11.Connection(our_role=h11.CLIENT)
    data = conn.send(h11.Request(method="GET", target=path, headers=headers))
    data += conn.send(h11.EndOfMessage())
    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(data)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.InformationalResponse | h11.Response):
                    status = event.status_code
                    response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    if status == 101:
                        break
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                else:
                    break
    return HttpResponse(status, response_headers, b"".join(chunks))


async def assert_session(relayd: RunningRelayd, token: str, origin: str | None) -> None:
    """A socket with ``origin`` (none: no Origin header) opens and is welcomed."""
    headers = [] if origin is None else [("Origin", origin)]
    url = f"{relayd.addresses.websocket_url}?token={token}"
    async with connect_url(url, headers=headers) as client:
        assert (await client.next())["type"] == "connection"


def assert_security_headers(response: HttpResponse, *, tls: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response)
    if tls:
        assert response.headers.get("strict-transport-security") == "max-age=31536000"
    else:
        assert "strict-transport-security" not in response.headers, response


# --- websocket.allowed_origins ------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("allowed", "origin"), [([APP], EVIL), ([], APP), ([APP], "null")])
async def test_a_browser_origin_not_listed_is_refused_with_a_json_403(
    nursery: trio.Nursery, tmp_path: Path, transport: str, allowed: list[str], origin: str
) -> None:
    relayd = await start(nursery, tmp_path, transport, websocket={"allowed_origins": allowed})
    response = await handshake(ws_address(relayd), origin=origin)
    error = assert_error(response, 403, "origin_not_allowed")
    assert error["details"] == {"origin": origin}
    assert_security_headers(response)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_listed_origin_and_a_client_without_origin_are_accepted(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    relayd = await start(nursery, tmp_path, transport, websocket={"allowed_origins": [APP]})
    alice = await relayd.http.register("alice")
    await assert_session(relayd, alice["access_token"], APP)
    await assert_session(relayd, alice["access_token"], None)
    assert (await handshake(ws_address(relayd), origin=APP)).status == 101


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_by_default_only_clients_without_origin_are_accepted(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    relayd = await start(nursery, tmp_path, transport)
    alice = await relayd.http.register("alice")
    await assert_session(relayd, alice["access_token"], None)
    assert (await handshake(ws_address(relayd), origin=APP)).status == 403


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_star_admits_any_origin(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    relayd = await start(nursery, tmp_path, transport, websocket={"allowed_origins": ["*"]})
    alice = await relayd.http.register("alice")
    await assert_session(relayd, alice["access_token"], EVIL)
    assert (await handshake(ws_address(relayd), origin="null")).status == 101


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_allowed_origins_apply_on_reload(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    relayd = await start(nursery, tmp_path, transport)
    assert (await handshake(ws_address(relayd), origin=APP)).status == 403
    config = relayd.daemon.config
    opened = attrs.evolve(config.websocket, allowed_origins=(APP,))
    applied, _ = relayd.daemon.reload(attrs.evolve(config, websocket=opened))
    assert applied == ["websocket.allowed_origins"]
    assert (await handshake(ws_address(relayd), origin=APP)).status == 101


# --- http.cors_origins --------------------------------------------------------------------------


def preflight(origin: str, method: str = "GET") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def header_set(response: HttpResponse, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item}


async def test_a_preflight_from_a_listed_origin_is_answered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start(nursery, tmp_path, http={"cors_origins": [APP]})
    for path, method in (
        ("/clients", "GET"),
        ("/register", "POST"),
        (f"/clients/{ALICE}", "DELETE"),
    ):
        response = await relayd.http.request("OPTIONS", path, headers=preflight(APP, method))
        assert (response.status, response.body) == (204, b""), response
        assert "content-type" not in response.headers, response
        assert "content-length" not in response.headers, response
        assert response.headers["access-control-allow-origin"] == APP
        assert method.lower() in header_set(response, "access-control-allow-methods")
        assert header_set(response, "access-control-allow-headers") == {
            "authorization",
            "content-type",
        }
        assert response.headers["access-control-max-age"] == "600"
        assert "origin" in header_set(response, "vary")
        assert "access-control-allow-credentials" not in response.headers
        assert_security_headers(response)


async def test_answers_to_a_listed_origin_may_be_read(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start(nursery, tmp_path, http={"cors_origins": [APP]})
    alice = await relayd.http.register("alice")
    ok = await relayd.http.get("/clients", token=alice["access_token"], headers={"Origin": APP})
    refused = await relayd.http.get("/clients", headers={"Origin": APP})
    for response in (ok, refused):
        assert response.headers["access-control-allow-origin"] == APP, response
        # A page may read why it must wait, or why its token was refused.
        exposed = header_set(response, "access-control-expose-headers")
        assert exposed == {"retry-after", "www-authenticate"}
    assert (ok.status, refused.status) == (200, 401)


@pytest.mark.parametrize("cors_origins", [[], [APP]])
async def test_an_origin_not_listed_gets_no_cors_headers(
    nursery: trio.Nursery, tmp_path: Path, cors_origins: list[str]
) -> None:
    relayd = await start(nursery, tmp_path, http={"cors_origins": cors_origins})
    answer = await relayd.http.get("/health/live", headers={"Origin": EVIL})
    asked = await relayd.http.request("OPTIONS", "/clients", headers=preflight(EVIL))
    assert (answer.status, asked.status) == (200, 204)
    for response in (answer, asked):
        assert not [h for h in response.headers if h.startswith("access-control-")], response


async def test_a_star_lets_any_page_read(nursery: trio.Nursery, tmp_path: Path) -> None:
    relayd = await start(nursery, tmp_path, http={"cors_origins": ["*"]})
    response = await relayd.http.get("/health/live", headers={"Origin": EVIL})
    assert response.headers["access-control-allow-origin"] == "*"


async def test_preflights_do_not_count_against_rate_limits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start(nursery, tmp_path, http={"cors_origins": [APP], "register_burst": 1})
    for _ in range(3):
        asked = await relayd.http.request("OPTIONS", "/register", headers=preflight(APP, "POST"))
        assert asked.status == 204, asked
    await relayd.http.register("alice")


async def test_cors_origins_apply_on_reload(nursery: trio.Nursery, tmp_path: Path) -> None:
    relayd = await start(nursery, tmp_path)
    before = await relayd.http.get("/health/live", headers={"Origin": APP})
    assert "access-control-allow-origin" not in before.headers
    config = relayd.daemon.config
    applied, _ = relayd.daemon.reload(
        attrs.evolve(config, http=attrs.evolve(config.http, cors_origins=(APP,)))
    )
    assert applied == ["http.cors_origins"]
    after = await relayd.http.get("/health/live", headers={"Origin": APP})
    assert after.headers["access-control-allow-origin"] == APP


# --- security headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/health/live", {}, 200),
        ("GET", "/clients", {}, 401),
        ("GET", "/nope", {}, 404),
        ("DELETE", "/health/live", {}, 405),
        ("POST", "/register", {"body": b"{}"}, 415),
        ("POST", "/register", {"json_body": {"name": ""}}, 422),
        ("GET", "/metrics", {}, 200),
    ],
)
async def test_every_rest_answer_carries_the_security_headers(
    relayd: RunningRelayd, method: str, path: str, kwargs: Mapping[str, Any], status: int
) -> None:
    response = await relayd.http.request(method, path, **kwargs)
    assert response.status == status, response
    assert_security_headers(response)


async def test_websocket_refusals_carry_the_security_headers(relayd: RunningRelayd) -> None:
    response = await handshake(relayd.addresses.http, path="/nope")
    assert_error(response, 404, "not_found")
    assert_security_headers(response)


async def test_the_dedicated_listeners_404_is_json_with_the_security_headers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start(nursery, tmp_path, "dedicated")
    response = await handshake(ws_address(relayd), path="/nope")
    assert_error(response, 404, "not_found")
    assert_security_headers(response)


async def test_the_metrics_listener_carries_the_security_headers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start(nursery, tmp_path, metrics={"listen": "127.0.0.1:0"})
    assert relayd.addresses.metrics is not None
    metrics = HttpClient(*relayd.addresses.metrics)
    for path, status in (("/metrics", 200), ("/clients", 404)):
        response = await metrics.get(path)
        assert response.status == status, response
        assert_security_headers(response)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_hsts_is_sent_with_tls_on_every_listener(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    relayd = await start(
        nursery,
        tmp_path,
        tls=tls_files(ca, tmp_path),
        websocket={"listen": "127.0.0.1:0"},
        metrics={"listen": "127.0.0.1:0"},
    )
    client = ssl.create_default_context()
    ca.configure_trust(client)
    assert relayd.addresses.websocket is not None
    assert relayd.addresses.metrics is not None
    for (host, port), path, status in (
        (relayd.addresses.http, "/health/live", 200),
        (relayd.addresses.http, "/nope", 404),
        (relayd.addresses.metrics, "/metrics", 200),
        (relayd.addresses.websocket, "/nope", 404),
    ):
        with trio.fail_after(IO_DEADLINE):
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client)
            async with stream:
                headers = {"Host": f"{host}:{port}", "Connection": "close"}
                if port == relayd.addresses.websocket[1]:
                    key = base64.b64encode(os.urandom(16)).decode()
                    headers.update(
                        {
                            "Upgrade": "websocket",
                            "Connection": "Upgrade",
                            "Sec-WebSocket-Key": key,
                            "Sec-WebSocket-Version": "13",
                        }
                    )
                response = await _exchange(stream, "GET", path, headers, None)
        assert response.status == status, response
        assert_security_headers(response, tls=True)
