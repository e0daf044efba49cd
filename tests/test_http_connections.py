"""relayd's HTTP port ends connections when it should.

quart-trio cancels a request's nursery as soon as the response is sent, and hypercorn closes
the socket (``Connection: close``) or arms the keep-alive idle timer inside that very send; see
``relayd/_asgi.py``. If that work is cancelled, connections stay open until the client leaves.
These tests hold a raw TCP connection and wait for the server's EOF, under a deadline.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import h11
import hypercorn.trio.run
import pytest
import trio
from hypercorn.trio.tcp_server import TCPServer

from relayd._hypercorn import install_hooks, missing_hooks

from .support import HttpResponse, RunningRelayd, make_config, start_relayd
from .test_rest import assert_error

# Every wait for the server in this file is bounded by this.
DEADLINE = 5.0
KEEP_ALIVE = 0.5


class RawConnection:
    """One TCP connection; requests are encoded and responses parsed with h11."""

    def __init__(self, stream: trio.SocketStream, host: str, port: int) -> None:
        self.stream = stream
        self.host = f"{host}:{port}"
        self._conn = h11.Connection(our_role=h11.CLIENT)
        self._pending: list[h11.Request] = []

    def _request(self, method: str, path: str, close: bool) -> h11.Request:
        headers = [("Host", self.host)]
        if close:
            headers.append(("Connection", "close"))
        return h11.Request(method=method, target=path, headers=headers)

    @staticmethod
    def encode(request: h11.Request) -> bytes:
        conn = h11.Connection(our_role=h11.CLIENT)
        return conn.send(request) + conn.send(h11.EndOfMessage())

    async def send(self, *requests: tuple[str, str, bool]) -> None:
        """Send ``(method, path, close)`` requests back to back, without waiting."""
        data = b"".join(self.encode(self._request(*r)) for r in requests)
        await self.stream.send_all(data)
        self._pending.extend(self._request(*r) for r in requests)

    async def read_response(self) -> HttpResponse:
        """The next response, complete; fails if the connection ends before it does."""
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        # Tell the parser which request this response answers (its bytes were sent already).
        request = self._pending.pop(0)
        self._conn.send(request)
        self._conn.send(h11.EndOfMessage())
        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return HttpResponse(status, headers, b"".join(chunks))
            else:
                raise AssertionError(f"the connection ended before a full response: {event!r}")

    async def expect_eof(self) -> None:
        """Wait until the server closes the connection; no more bytes may come first."""
        assert not self._conn.trailing_data[0], "the server sent bytes nobody asked for"
        data = await self.stream.receive_some(65536)
        assert data == b"", f"expected EOF, got {bytes(data)!r}"


async def connect(relayd: RunningRelayd) -> RawConnection:
    host, port = relayd.addresses.http
    stream = await trio.open_tcp_stream(host, port)
    return RawConnection(stream, host, port)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/health/live", 200),
        ("GET", "/health/ready", 200),
        ("GET", "/no-such-route", 404),
        ("DELETE", "/health/live", 405),
        ("GET", "/clients", 401),
    ],
)
async def test_connection_close_is_honoured(
    relayd: RunningRelayd, method: str, path: str, status: int
) -> None:
    with trio.fail_after(DEADLINE):
        connection = await connect(relayd)
        async with connection.stream:
            await connection.send((method, path, True))
            response = await connection.read_response()
            assert response.status == status, response
            assert response.headers.get("connection") == "close", response
            await connection.expect_eof()


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {"http": {"keep_alive_timeout": KEEP_ALIVE}})
    relayd = await start_relayd(nursery, config)
    with trio.fail_after(DEADLINE):
        connection = await connect(relayd)
        async with connection.stream:
            await connection.send(("GET", "/health/live", False))
            response = await connection.read_response()
            answered = trio.current_time()
            assert response.status == 200, response
            assert response.json() == {"status": "live"}
            assert "close" not in response.headers.get("connection", "").lower(), response
            await connection.expect_eof()
            closed = trio.current_time()
    # Kept open while idle for the keep-alive timeout, not cut short; the deadline bounds it.
    assert closed - answered >= KEEP_ALIVE - 0.1


async def test_keep_alive_connection_serves_requests_one_after_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {"http": {"keep_alive_timeout": KEEP_ALIVE}})
    relayd = await start_relayd(nursery, config)
    with trio.fail_after(DEADLINE):
        connection = await connect(relayd)
        async with connection.stream:
            for path in ("/health/live", "/health/ready", "/health/live"):
                await connection.send(("GET", path, False))
                assert (await connection.read_response()).status == 200
            await connection.expect_eof()


async def test_pipelined_requests_are_all_answered(relayd: RunningRelayd) -> None:
    with trio.fail_after(DEADLINE):
        connection = await connect(relayd)
        async with connection.stream:
            await connection.send(
                ("GET", "/health/live", False),
                ("GET", "/health/ready", False),
                ("GET", "/no-such-route", True),
            )
            first = await connection.read_response()
            second = await connection.read_response()
            third = await connection.read_response()
            assert (first.status, first.json()) == (200, {"status": "live"})
            assert (second.status, second.json()) == (200, {"status": "ready"})
            assert third.status == 404
            assert third.json()["error"]["code"] == "not_found"
            # The last one asked to close.
            await connection.expect_eof()


async def test_stop_closes_idle_keep_alive_connections_at_once(tmp_path: Path) -> None:
    """An idle keep-alive connection neither outlives a stop nor holds the drain up."""
    config = make_config(tmp_path, {"drain_timeout": 30.0, "http": {"keep_alive_timeout": 60.0}})
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as inner:
            relayd = await start_relayd(inner, config)
            connection = await connect(relayd)
            async with connection.stream:
                await connection.send(("GET", "/health/live", False))
                assert (await connection.read_response()).status == 200
                relayd.daemon.stop()
                await connection.expect_eof()
        # The inner nursery is done: Daemon.run returned, well before drain_timeout.


# --- answers that do not wait for the body, and clients that leave ---------------------------


async def read_head_and_body(
    stream: trio.SocketStream, method: str = "GET"
) -> tuple[HttpResponse, h11.Connection]:
    """The next response on ``stream``, parsed with h11 (the request was written raw)."""
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "relayd")]))
    status = 0
    headers: dict[str, str] = {}
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, headers, b"".join(chunks)), conn
        else:
            raise AssertionError(f"the connection ended before a full response: {event!r}")


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relayd", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Requests that declare a body relayd answers without reading it all (the body never comes).
EARLY = [
    (head("GET", "/clients", "Content-Length: 1000"), 401),
    (head("GET", "/health/live", "Content-Length: 1000"), 200),
    (head("GET", "/clients", "Transfer-Encoding: chunked"), 401),
    (head("POST", "/register", "Content-Type: text/plain", "Content-Length: 1000") + b"{", 415),
    # register_burst is 1 in these tests, and the 415 above took it.
    (head("POST", "/register", "Content-Type: application/json", "Content-Length: 1000"), 429),
]


async def test_an_answer_given_before_the_body_says_connection_close(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """hypercorn closes such a connection after the answer (the unread body would be parsed
    as the next request): the answer must say so, or a keep-alive client's next request on it
    meets EOF."""
    config = make_config(tmp_path, {"http": {"register_burst": 1}})
    relayd = await start_relayd(nursery, config)
    host, port = relayd.addresses.http
    for request, status in EARLY:
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                response, conn = await read_head_and_body(stream)
                assert response.status == status, (request, response)
                assert response.headers.get("connection") == "close", (request, response)
                assert not conn.trailing_data[0]
                # The next request of a keep-alive client gets nothing: the server closes.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head("GET", "/health/live"))
                assert await stream.receive_some(65536) == b""


async def test_a_request_whose_body_was_read_keeps_its_connection(relayd: RunningRelayd) -> None:
    host, port = relayd.addresses.http
    body = b'{"name": "alice"}'
    request = head(
        "POST", "/register", "Content-Type: application/json", f"Content-Length: {len(body)}"
    )
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(request + body)
            registered, _ = await read_head_and_body(stream, "POST")
            assert registered.status == 200, registered
            assert "connection" not in registered.headers, registered
            await stream.send_all(head("GET", "/health/live"))
            live, _ = await read_head_and_body(stream)
            assert (live.status, live.json()) == (200, {"status": "live"})


async def test_clients_that_leave_while_their_body_is_due_log_no_error(
    relayd: RunningRelayd, caplog: pytest.LogCaptureFixture
) -> None:
    """The client reads the answer's head and closes: hypercorn then closed the connection
    while the app was still writing the answer's body, and trio's conflict detector raised
    BusyResourceError in that write ("Error in ASGI Framework"). Each round hit it about one
    time in two."""
    host, port = relayd.addresses.http
    for request, _ in EARLY[:4] * 15:
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                received = b""
                while b"\r\n\r\n" not in received:
                    data = await stream.receive_some(65536)
                    assert data, received
                    received += data
    with trio.fail_after(DEADLINE):
        assert (await relayd.http.get("/health/live")).status == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# --- framing errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(
            head(
                "POST", "/register", "Content-Type: application/json", "Transfer-Encoding: chunked"
            )
            + b"zz\r\n{}\r\n0\r\n\r\n",
            400,
            "bad_request",
            id="bad chunk size",
        ),
        pytest.param(
            head("POST", "/register", "Content-Length: 2", "Content-Length: 3") + b"{}",
            400,
            "bad_request",
            id="conflicting Content-Length",
        ),
        pytest.param(
            head("GET", "/health/live", "X-Big: " + "a" * 100_000),
            431,
            "headers_too_large",
            id="100 KB header",
        ),
        pytest.param(
            head("POST", "/register", "Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
            id="gzip, chunked",
        ),
    ],
)
async def test_framing_errors_are_answered_with_json(
    relayd: RunningRelayd, request_bytes: bytes, status: int, code: str
) -> None:
    host, port = relayd.addresses.http
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            # The server may answer and close before it has read everything.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(request_bytes)
            response, _ = await read_head_and_body(stream)
            assert_error(response, status, code)
            assert response.headers.get("connection") == "close", response
            assert response.headers.get("x-content-type-options") == "nosniff", response
            assert await stream.receive_some(65536) == b""


def test_relayds_hypercorn_hooks_are_in_place() -> None:
    """relayd's fixes ride on hypercorn internals: an upgrade that moves them fails here (and
    makes the daemon warn at start), rather than silently losing the fixes."""
    install_hooks()  # as serving does (idempotent): the test holds when run alone too
    assert missing_hooks() == []


def test_a_hypercorn_that_lost_a_hook_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install_hooks()
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", TCPServer)
    assert missing_hooks() == ["hypercorn.trio.run.TCPServer is not relayd's"]
