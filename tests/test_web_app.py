"""The browser client relayd serves under ``/app/`` (``http.serve_app``): its files, the
Content-Security-Policy chosen per response (the page's own, the API's everywhere else, over
HTTP/1.1 and HTTP/2), the WebSocket origin it is admitted from, and its packaging. Over real
loopback sockets; the page itself runs in tests/test_web_client.py."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio

import relayd._hypercorn as hypercorn_hooks
from relayd._browser import API_CSP, APP_CSP, own_origins
from relayd._http import _APP_FILES
from relayd._hypercorn import RelaydConfig, install_hooks

from .support import IO_DEADLINE, RunningRelayd, make_config, start_relayd
from .test_browser import handshake

ROOT = Path(__file__).parent.parent
APP = APP_CSP.decode()
API = API_CSP.decode()
OTHER_SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


async def raw_get(
    address: tuple[str, int], path: str, *, method: str = "GET"
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 request; the status, every header as sent (repeats kept), the body."""
    conn = h11.Connection(our_role=h11.CLIENT)
    host, port = address
    headers = [("Host", f"{host}:{port}"), ("Connection", "close")]
    data = conn.send(h11.Request(method=method, target=path, headers=headers))
    data += conn.send(h11.EndOfMessage())
    status, head, body = 0, [], b""
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    head = [(k.decode().lower(), v.decode()) for k, v in event.headers]
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                else:
                    break
    return status, head, body


def policies(head: list[tuple[str, str]]) -> list[str]:
    return [value for name, value in head if name == "content-security-policy"]


def header(head: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in head if key == name), None)


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/app/", "text/html; charset=utf-8", b'<script type="module" src="app.js">'),
        ("/app/relayd.js", "text/javascript; charset=utf-8", b"export class RelaydClient"),
        ("/app/app.js", "text/javascript; charset=utf-8", b'from "./relayd.js"'),
        ("/app/app.css", "text/css; charset=utf-8", b"#messages"),
        ("/app/icon.svg", "image/svg+xml", b"<svg"),
    ],
)
async def test_the_page_and_its_files_carry_the_pages_own_policy(
    relayd: RunningRelayd, path: str, content_type: str, marker: bytes
) -> None:
    status, head, body = await raw_get(relayd.addresses.http, path)
    assert status == 200, head
    assert header(head, "content-type") == content_type
    assert marker in body
    # Exactly one policy: two would both apply, and the API's would forbid the page's script.
    assert policies(head) == [APP]
    for name, value in OTHER_SECURITY_HEADERS.items():
        assert header(head, name) == value, name


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/health/live", 200),
        ("GET", "/clients", 401),
        ("GET", "/metrics", 200),
        ("GET", "/nope", 404),
        ("GET", "/app/nope", 404),
        ("GET", "/app/../relayd.js", 404),
        ("DELETE", "/app/", 405),
        ("GET", "/app", 308),
    ],
)
async def test_every_other_response_keeps_the_apis_policy(
    relayd: RunningRelayd, method: str, path: str, status: int
) -> None:
    got, head, _ = await raw_get(relayd.addresses.http, path, method=method)
    assert got == status, head
    assert policies(head) == [API]


async def test_app_without_its_slash_is_sent_to_it(relayd: RunningRelayd) -> None:
    status, head, body = await raw_get(relayd.addresses.http, "/app")
    assert (status, header(head, "location"), body) == (308, "/app/", b"")


async def test_hypercorns_own_answers_keep_the_apis_policy(relayd: RunningRelayd) -> None:
    host, port = relayd.addresses.http
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 400"), head
    assert head.count("content-security-policy:") == 1
    assert f"content-security-policy: {API}".lower() in head


async def test_websocket_refusals_keep_the_apis_policy(relayd: RunningRelayd) -> None:
    response = await handshake(relayd.addresses.http, origin="https://evil.example")
    assert response.status == 403
    assert response.headers["content-security-policy"] == API


async def h2_get(address: tuple[str, int], path: str) -> tuple[int, list[tuple[str, str]]]:
    """One HTTP/2 request in clear (prior knowledge): the status and every header."""
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "relayd")],
        end_stream=True,
    )
    head: list[tuple[str, str]] = []
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(conn.data_to_send())
            # To the response's end: a client that leaves before it is written holds the
            # request open on hypercorn's HTTP/2 for as long as relayd lets the write last.
            while data := await stream.receive_some(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived) and event.headers:
                        head = [(str(k), str(v)) for k, v in event.headers]
                    elif isinstance(event, h2.events.StreamEnded):
                        return int(dict(head)[":status"]), head
                await stream.send_all(conn.data_to_send())
    raise AssertionError("the connection closed before the response ended")


@pytest.mark.parametrize(("path", "policy"), [("/app/", APP), ("/health/live", API)])
async def test_over_http2_each_response_has_one_policy(
    relayd: RunningRelayd, path: str, policy: str
) -> None:
    status, head = await h2_get(relayd.addresses.http, path)
    assert status == 200
    assert policies(head) == [policy]


@pytest.fixture
def hooks_as_installed() -> Iterator[set[str]]:
    install_hooks()
    installed = hypercorn_hooks._installed
    saved = set(installed)
    yield installed
    installed.clear()
    installed.update(saved)


def test_without_relayds_protocols_every_response_gets_the_apis_policy(
    hooks_as_installed: set[str],
) -> None:
    """Should a hypercorn upgrade leave a protocol unhooked, the API's policy goes on every
    response again: the page breaks, the API stays locked down."""
    assert (b"content-security-policy", API_CSP) not in RelaydConfig().response_headers("h11")
    hooks_as_installed.discard("h2_protocol")
    assert (b"content-security-policy", API_CSP) in RelaydConfig().response_headers("h11")


# --- http.serve_app = false ---------------------------------------------------------------------


async def test_serve_app_false_serves_no_page_and_admits_no_own_origin(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path, {"http": {"serve_app": False}}))
    host, port = relayd.addresses.http
    for path in ("/app/", "/app/relayd.js", "/app"):
        status, head, _ = await raw_get(relayd.addresses.http, path)
        assert status == 404, path
        assert policies(head) == [API]
    response = await handshake(relayd.addresses.http, origin=f"http://{host}:{port}")
    assert response.status == 403


async def test_the_page_is_told_the_websocket_path(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"websocket": {"path": '/relay"<x>'}})
    relayd = await start_relayd(nursery, config)
    _, _, body = await raw_get(relayd.addresses.http, "/app/")
    assert b'<meta name="relayd-websocket-path" content="/relay&quot;&lt;x&gt;">' in body


# --- the page's own origin ----------------------------------------------------------------------


async def test_the_pages_own_origin_may_open_a_websocket(relayd: RunningRelayd) -> None:
    """The page is served from this port's own address: a handshake from that origin (or
    localhost, for a loopback address) is admitted with ``websocket.allowed_origins`` empty.
    Any other origin, the same host over another scheme or port included, is not."""
    host, port = relayd.addresses.http
    for origin in (f"http://{host}:{port}", f"http://localhost:{port}"):
        response = await handshake(relayd.addresses.http, origin=origin)
        assert response.status == 101, (origin, response)
    for origin in (
        f"https://{host}:{port}",
        f"http://{host}:{port + 1}",
        f"http://evil.example:{port}",
        f"http://{host}",
    ):
        response = await handshake(relayd.addresses.http, origin=origin)
        assert response.status == 403, (origin, response)


@pytest.mark.parametrize(
    ("scheme", "server", "origins"),
    [
        ("ws", ("127.0.0.1", 8000), ("http://127.0.0.1:8000", "http://localhost:8000")),
        ("wss", ("127.0.0.1", 443), ("https://127.0.0.1", "https://localhost")),
        ("ws", ("::1", 80), ("http://[::1]", "http://localhost")),
        ("ws", ("::ffff:127.0.0.1", 8000), ("http://127.0.0.1:8000", "http://localhost:8000")),
        ("https", ("192.0.2.7", 8443), ("https://192.0.2.7:8443",)),
        ("ws", ("2001:db8::7", 8000), ("http://[2001:db8::7]:8000",)),
        ("ws", ("/run/relayd.sock", 0), ()),
        ("ws", None, ()),
    ],
)
def test_own_origins_come_from_the_sockets_address(
    scheme: str, server: tuple[str, int] | None, origins: tuple[str, ...]
) -> None:
    assert own_origins(scheme, server) == origins


# --- packaging ----------------------------------------------------------------------------------


def test_every_file_of_the_browser_client_is_package_data() -> None:
    """An installed relayd serves the page: each of its files is in the distribution."""
    pyproject: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["relayd.web"]
    web = ROOT / "relayd" / "web"
    files = sorted(p.name for p in web.iterdir() if p.is_file() and p.suffix != ".py")
    assert sorted(filename for filename, _ in _APP_FILES.values()) == files
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
