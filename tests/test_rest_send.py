"""``POST /messages``: sending without a socket (issue 14), against a real relayd on loopback,
on both engines (and two nodes on one Redis).

What must hold: a message sent over REST and one sent over a socket are indistinguishable to
the recipient; dedupe spans both paths; the answer is the first receipt (202 on its way, 200
final) and later receipts go to the sender's live socket, which the REST send never replaces,
or are owed until it connects; every refusal is the documented JSON error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from .support import IO_DEADLINE, HttpResponse, RunningRelayd, _exchange, make_config, start_relayd
from .support import Engine as StoreEngine
from .test_cluster import cluster
from .test_rest import admin_token, assert_error
from .ws_support import WsClient, welcomed, ws_connect

Doc = dict[str, Any]
RECEIPT_KEYS = ["msgid", "to", "status", "final", "timestamp", "message", "reason", "duplicate"]


async def rest_send(relayd: RunningRelayd, token: str, doc: Any) -> HttpResponse:
    return await relayd.http.post("/messages", doc, token=token)


def answered(response: HttpResponse, status: int) -> Doc:
    """The receipt of an accepted REST send, checked for its documented keys."""
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json"), response
    doc: Doc = response.json()
    assert list(doc) == RECEIPT_KEYS, doc
    return doc


async def ws_send(socket: WsClient, doc: Doc) -> Doc:
    """Send ``doc`` on ``socket``; its ``delivery_status``."""
    await socket.send(doc)
    return await socket.next_of("delivery_status")


async def test_a_message_sent_over_rest_reaches_a_socket_as_one_sent_over_a_socket(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    envelope = {
        "to": bob["uuid"],
        "from": alice["uuid"],
        "timestamp": 1795443805.5,
        "priority": "high",
        "subject": "s",
        "acknowledge": True,
        "content": "héllo",
        "action": "a",
        "event": "e",
        "status": "st",
        "conversation_id": "c-1",
        "msgno": 42,
        "ttl": 600,
    }
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        assert (await ws_send(a, {**envelope, "msgid": "ws-1"}))["status"] == "queued_offline"
        rest = answered(
            await rest_send(relayd, alice["access_token"], {**envelope, "msgid": "rest-1"}), 202
        )
    assert (rest["msgid"], rest["to"], rest["status"], rest["final"]) == (
        "rest-1",
        bob["uuid"],
        "queued_offline",
        False,
    )
    assert (rest["reason"], rest["duplicate"]) == (None, False)
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        by_ws, by_rest = await b.next_of("message"), await b.next_of("message")
    assert (by_ws.pop("msgid"), by_rest.pop("msgid")) == ("ws-1", "rest-1")
    assert list(by_rest) == list(by_ws)
    for key in by_ws:
        assert by_rest[key] == by_ws[key], key


async def test_dedupe_spans_the_socket_and_rest(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    token = alice["access_token"]
    message = {"to": bob["uuid"], "acknowledge": True}
    async with ws_connect(relayd, token) as a:
        await welcomed(a)
        assert (await ws_send(a, {**message, "msgid": "m1"}))["status"] == "queued_offline"
        again = answered(await rest_send(relayd, token, {**message, "msgid": "m1"}), 202)
        assert (again["status"], again["duplicate"]) == ("queued_offline", True)
        first = answered(await rest_send(relayd, token, {**message, "msgid": "m2"}), 202)
        assert (first["status"], first["duplicate"]) == ("queued_offline", False)
        status = await ws_send(a, {**message, "msgid": "m2"})
        assert (status["status"], status["duplicate"]) == ("queued_offline", True)
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        assert [(await b.next_of("message"))["msgid"] for _ in range(2)] == ["m1", "m2"]
        await b.send({"type": "ping"})
        assert (await b.next())["type"] == "pong"  # and nothing else came before it


async def test_later_receipts_go_to_the_senders_live_socket_which_stays_open(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        message = {"to": bob["uuid"], "msgid": "m1", "acknowledge": True}
        doc = answered(await rest_send(relayd, alice["access_token"], message), 202)
        assert doc["status"] == "pending_ack"
        assert (await b.next_of("message"))["msgid"] == "m1"
        await b.send({"type": "ack", "msgid": "m1"})
        # The first frame alice's socket gets is the update: no delivery_status, no close.
        update = await a.next()
        assert (update["type"], update["msgid"], update["status"]) == (
            "delivery_update",
            "m1",
            "acknowledged",
        )
        # An acknowledge: false message to a connected recipient: its only receipt, final.
        direct = {"to": bob["uuid"], "msgid": "m2", "content": "now"}
        doc = answered(await rest_send(relayd, alice["access_token"], direct), 200)
        assert (doc["status"], doc["final"]) == ("delivered", True)
        assert (await b.next_of("message"))["content"] == "now"
        await a.send({"type": "ping"})
        assert (await a.next())["type"] == "pong"  # nothing about m2 on the socket


async def test_a_final_receipt_is_owed_to_a_sender_without_a_socket(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        message = {"to": bob["uuid"], "msgid": "m1", "acknowledge": True}
        assert answered(await rest_send(relayd, alice["access_token"], message), 202)["status"] == (
            "pending_ack"
        )
        await b.send({"type": "ack", "msgid": (await b.next_of("message"))["msgid"]})
        assert (await b.next_of("ack_received"))["status"] == "acknowledged"
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        update = await a.next()
        assert (update["type"], update["msgid"], update["status"]) == (
            "delivery_update",
            "m1",
            "acknowledged",
        )


@pytest.mark.sqlite_only("the deadline is the hub's, the same on both engines")
async def test_past_the_deadline_the_answer_is_accepted_and_receipts_follow_on_the_socket(
    nursery: trio.Nursery, tmp_path: Path, engine: StoreEngine
) -> None:
    # No receipt can come before a deadline that has passed when the request starts waiting.
    config = make_config(tmp_path, {"http": {"send_timeout": 1e-9}}, engine)
    relayd = await start_relayd(nursery, config)
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        message = {"to": bob["uuid"], "msgid": "m1", "acknowledge": True}
        doc = answered(await rest_send(relayd, alice["access_token"], message), 202)
        assert (doc["msgid"], doc["status"], doc["final"]) == ("m1", "accepted", False)
        update = await a.next()
        assert (update["type"], update["msgid"], update["status"]) == (
            "delivery_update",
            "m1",
            "queued_offline",
        )


async def test_a_rest_send_on_one_node_reaches_a_socket_on_another(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_b.http.register("bob")
        async with (
            ws_connect(node_b, bob["access_token"]) as b,
            ws_connect(node_b, alice["access_token"]) as a,
        ):
            await welcomed(b)
            await welcomed(a)
            message = {"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"}
            doc = answered(await rest_send(node_a, alice["access_token"], message), 202)
            # Node A does not hold bob: as for a socket there, the message is stored first.
            assert doc["status"] == "queued_offline"
            got = await b.next_of("message")
            assert (got["msgid"], got["from"], got["content"]) == ("m1", alice["uuid"], "x")
            await b.send({"type": "ack", "msgid": "m1"})
            # Alice's receipt reaches her socket on node B; her session there stays open.
            update = await a.next()
            assert (update["type"], update["status"]) == ("delivery_update", "acknowledged")
            # Dedupe across nodes: node B's memory never saw m1, its store did.
            again = answered(await rest_send(node_b, alice["access_token"], message), 200)
            assert (again["status"], again["duplicate"]) == ("acknowledged", True)


# --- hostile requests -----------------------------------------------------------------------------


async def test_without_a_valid_token_nothing_is_sent(relayd: RunningRelayd) -> None:
    bob = await relayd.http.register("bob")
    message = {"to": bob["uuid"], "content": "x"}
    assert_error(await relayd.http.post("/messages", message), 401, "missing_token")
    assert_error(await rest_send(relayd, "garbage", message), 401, "token_invalid")
    refused = await rest_send(relayd, bob["refresh_token"], message)
    assert refused.status == 401
    operator = await rest_send(relayd, admin_token(relayd), message)
    assert_error(operator, 403, "not_a_client")
    count = await relayd.http.get(f"/clients/{bob['uuid']}/undelivered", token=bob["access_token"])
    assert count.json()["count"] == 0


async def test_another_clients_from_is_refused(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, mallory = [await http.register(n) for n in ("alice", "bob", "mallory")]
    forged = {"to": bob["uuid"], "from": alice["uuid"], "content": "trust me"}
    error = assert_error(await rest_send(relayd, mallory["access_token"], forged), 403)
    assert (error["code"], error["details"]["field"]) == ("MESSAGE_SENDER_MISMATCH", "from")


@pytest.mark.parametrize(
    ("doc", "status", "code", "field"),
    [
        ({"content": "no to"}, 422, "INVALID_MESSAGE_FORMAT", "to"),
        ({"to": "not-a-uuid"}, 422, "INVALID_MESSAGE_FORMAT", "to"),
        ({"to": "BOB", "msgno": 2**70}, 422, "INVALID_MESSAGE_FORMAT", "msgno"),
        ({"to": "BOB", "msgid": "x" * 129}, 422, "INVALID_MESSAGE_FORMAT", "msgid"),
        ({"to": "BOB", "type": "ack", "msgid": "m1"}, 422, "unknown_type", "type"),
        ([{"to": "BOB"}], 400, "invalid_json", None),
    ],
)
async def test_an_invalid_envelope_is_the_documented_error(
    relayd: RunningRelayd, doc: Any, status: int, code: str, field: str | None
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: bob["uuid"] if v == "BOB" else v for k, v in value.items()}
        return [fill(v) for v in value]

    error = assert_error(await rest_send(relayd, alice["access_token"], fill(doc)), status, code)
    assert error["details"].get("field") == field


async def test_bad_json_and_a_wrong_content_type_are_refused(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    token = alice["access_token"]
    json_type = {"Content-Type": "application/json"}
    for body in (b'{"to": ', b"\xff\xfe", b'{"to": NaN}'):
        response = await relayd.http.post("/messages", body=body, headers=json_type, token=token)
        assert_error(response, 400, "invalid_json")
    text = await relayd.http.post(
        "/messages", body=b'{"to": "x"}', headers={"Content-Type": "text/plain"}, token=token
    )
    assert_error(text, 415, "unsupported_media_type")


async def test_an_unknown_recipient_is_404(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    nobody = "00000000-0000-4000-8000-000000000000"
    message = {"to": nobody, "msgid": "m1"}
    error = assert_error(await rest_send(relayd, alice["access_token"], message), 404)
    assert (error["code"], error["details"]) == ("unknown_recipient", {"msgid": "m1", "to": nobody})


async def test_a_body_bigger_than_a_frame_is_413(
    nursery: trio.Nursery, tmp_path: Path, engine: StoreEngine
) -> None:
    config = make_config(tmp_path, {"websocket": {"max_frame_bytes": 1024}}, engine)
    relayd = await start_relayd(nursery, config)
    alice, bob = await relayd.http.register("alice"), await relayd.http.register("bob")
    token = alice["access_token"]
    fits = {"to": bob["uuid"], "content": "x" * 900}
    assert (await rest_send(relayd, token, fits)).status == 202
    huge = {"to": bob["uuid"], "content": "x" * 1024}
    error = assert_error(await rest_send(relayd, token, huge), 413, "payload_too_large")
    assert error["details"] == {"limit": 1024}
    # Past http.max_body_bytes too (65,536): refused before it is read.
    giant = {"to": bob["uuid"], "content": "x" * 100_000}
    assert_error(await rest_send(relayd, token, giant), 413, "payload_too_large")
    # Chunked, without a Content-Length: counted as it is read.
    chunked = await chunked_post(relayd, token, json.dumps(huge).encode())
    assert_error(chunked, 413, "payload_too_large")
    assert (await chunked_post(relayd, token, json.dumps(fits).encode())).status == 202
    # A Content-Length over the bound is refused before a byte of the body is read.
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(*relayd.addresses.http)
        async with stream:
            await stream.send_all(
                b"POST /messages HTTP/1.1\r\nHost: relayd\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: 2000\r\n\r\n".encode()
            )
            head = await stream.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 413 "), head
    waiting = await relayd.http.get(
        f"/clients/{bob['uuid']}/undelivered", token=bob["access_token"]
    )
    assert waiting.json()["count"] == 2


async def chunked_post(relayd: RunningRelayd, token: str, body: bytes) -> HttpResponse:
    headers = {
        "Host": "relayd",
        "Connection": "close",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
        "Transfer-Encoding": "chunked",
    }
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(*relayd.addresses.http)
        async with stream:
            return await _exchange(stream, "POST", "/messages", headers, body)


async def test_a_flood_is_429_with_retry_after_and_shares_the_sockets_rate(
    nursery: trio.Nursery, tmp_path: Path, engine: StoreEngine
) -> None:
    overrides = {"websocket": {"messages_per_second": 0.5, "message_burst": 3}}
    relayd = await start_relayd(nursery, make_config(tmp_path, overrides, engine))
    alice, bob = await relayd.http.register("alice"), await relayd.http.register("bob")
    token = alice["access_token"]
    message = {"to": bob["uuid"]}
    assert (await rest_send(relayd, token, {"content": "invalid"})).status == 422  # counts
    for _ in range(2):
        assert (await rest_send(relayd, token, message)).status == 202
    flood = await rest_send(relayd, token, message)
    error = assert_error(flood, 429, "rate_limited")
    assert flood.headers["retry-after"] == "2"
    assert error["details"]["retry_after"] == 2
    # Alice's socket draws on the same allowance.
    async with ws_connect(relayd, token) as a:
        await welcomed(a)
        await a.send(message)
        assert (await a.next_of("error"))["error"]["code"] == "rate_limited"
    waiting = await relayd.http.get(
        f"/clients/{bob['uuid']}/undelivered", token=bob["access_token"]
    )
    assert waiting.json()["count"] == 2
