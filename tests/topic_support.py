"""Support for the topics' end-to-end tests (issue 13): a daemon with room for many requests,
the topic routes as one-line calls, and publishing over a socket.

Every call goes to a real relayd over loopback; every wait is bounded (``IO_DEADLINE`` in the
HTTP and WebSocket clients, ``PUBLISH_DEADLINE`` around what waits on several frames).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from .support import (
    IO_DEADLINE,
    Engine,
    HttpClient,
    HttpResponse,
    RunningRelayd,
    _merge,
    make_config,
    start_relayd,
)
from .test_rest import assert_error, assert_ok
from .ws_support import WsClient

Doc = dict[str, Any]
# Rate limits out of the way: these tests register many clients and make many calls each.
ROOMY = {"http": {"register_burst": 1000, "api_burst": 10_000, "auth_burst": 1000}}
# What waits on several frames in a row (a publish, its fan-out, its counts) gives up after.
PUBLISH_DEADLINE = 3 * IO_DEADLINE
# The keys of a topic as the routes show it (anonymous readers: without the last two).
TOPIC_KEYS = [
    "id",
    "topic_id",
    "creator",
    "metadata",
    "access",
    "publish",
    "presence",
    "history_count",
    "history_age",
    "created_at",
    "subscriber_count",
    "last_offset",
]
TOPIC_SENT_KEYS = ["type", "message", "topic_id", "msgid", "subscribers", "offset", "timestamp"]
TOPIC_UPDATE_KEYS = [
    "type",
    "topic",
    "msgid",
    "subscribers",
    "delivered",
    "acknowledged",
    "failed",
    "expired",
    "pending",
    "timestamp",
]


async def start_topics(
    nursery: trio.Nursery,
    tmp_path: Path,
    engine: Engine,
    overrides: Mapping[str, Any] | None = None,
) -> RunningRelayd:
    """relayd on ``engine`` with :data:`ROOMY` rate limits and ``overrides``."""
    config = make_config(tmp_path, _merge(ROOMY, overrides or {}), engine)
    return await start_relayd(nursery, config)


async def register(http: HttpClient, *names: str) -> list[Doc]:
    return [await http.register(name) for name in names]


def token_of(client: Doc) -> str:
    token: str = client["access_token"]
    return token


async def create(
    http: HttpClient, token: str, topic_id: str, *, query: bool = False, **settings: Any
) -> Doc:
    """Create a topic (the token as ``?token=`` when ``query``); its ``topic`` object."""
    response = await create_response(http, token, {"topic_id": topic_id, **settings}, query=query)
    doc = assert_ok(response)
    assert (doc["topic_id"], doc["message"]) == (topic_id, "Topic created successfully"), doc
    topic: Doc = doc["topic"]
    return topic


async def create_response(
    http: HttpClient, token: str | None, body: Any, *, query: bool = False
) -> HttpResponse:
    if query and token is not None:
        return await http.post(f"/topics/create?token={token}", body)
    return await http.post("/topics/create", body, token=token)


async def subscribe(http: HttpClient, token: str, topic_id: str) -> HttpResponse:
    return await http.post("/topics/subscribe", {"topic_id": topic_id}, token=token)


async def unsubscribe(http: HttpClient, token: str, topic_id: str) -> HttpResponse:
    return await http.post("/topics/unsubscribe", {"topic_id": topic_id}, token=token)


async def subscribed(http: HttpClient, token: str, topic_id: str) -> None:
    """Subscribe; the test fails unless it is a new subscription."""
    doc = assert_ok(await subscribe(http, token, topic_id))
    assert (doc["subscribed"], doc["message"]) == (True, f"Subscribed to topic {topic_id}"), doc


async def patch(http: HttpClient, token: str | None, topic_id: str, body: Any) -> HttpResponse:
    return await http.request("PATCH", f"/topics/{topic_id}", json_body=body, token=token)


async def topic(http: HttpClient, token: str | None, topic_id: str) -> Doc:
    """``GET /topics/{topic_id}``, which must answer 200."""
    return assert_ok(await http.get(f"/topics/{topic_id}", token=token))


async def listed(http: HttpClient, token: str | None, query: str = "") -> list[str]:
    """The ids ``GET /topics`` lists (the test fails unless it answers 200)."""
    doc = assert_ok(await http.get(f"/topics{query}", token=token))
    ids = [t["id"] for t in doc["topics"]]
    assert doc["count"] == len(ids), doc
    return ids


async def history(http: HttpClient, token: str | None, topic_id: str, query: str = "") -> Doc:
    return assert_ok(await http.get(f"/topics/{topic_id}/messages{query}", token=token))


def assert_topic_not_found(response: HttpResponse, topic_id: str) -> None:
    """The one answer for a topic that does not exist or that the caller may not see."""
    error = assert_error(response, 404, "TOPIC_NOT_FOUND")
    assert error["details"] == {"topic_id": topic_id}, error


# --- over a socket ------------------------------------------------------------------------------


async def publish(
    socket: WsClient, topic_id: str, msgid: str, *, duplicate: bool = False, **fields: Any
) -> Doc:
    """Publish on ``socket`` (``content`` defaults to ``c-<msgid>``); its ``topic_sent``, which
    must be the next frame the socket gets (``duplicate``: one saying so)."""
    await socket.send({"topic_id": topic_id, "msgid": msgid, "content": f"c-{msgid}", **fields})
    answer = await socket.next()
    assert answer["type"] == "topic_sent", answer
    assert list(answer) == TOPIC_SENT_KEYS + ["duplicate"] * duplicate, answer
    assert (answer["topic_id"], answer["msgid"]) == (topic_id, msgid), answer
    return answer


async def refused(socket: WsClient, frame: Mapping[str, Any] | str) -> Doc:
    """Send ``frame``; the ``error`` object of the error frame that must answer it."""
    await socket.send(frame)
    answer = await socket.next()
    assert answer["type"] == "error", answer
    assert set(answer) == {"type", "error", "recovery", "timestamp"}, answer
    assert answer["recovery"], answer
    error: Doc = answer["error"]
    return error


async def assert_quiet(socket: WsClient) -> None:
    """Nothing waits for ``socket`` but what a ping brings: the pong. (The socket is open.)"""
    await socket.send({"type": "ping"})
    frame = await socket.next()
    assert frame["type"] == "pong", frame


async def frames_until(socket: WsClient, last: Callable[[Doc], bool]) -> list[Doc]:
    """Every frame ``socket`` gets up to the first for which ``last`` is true, included."""
    seen: list[Doc] = []
    with trio.fail_after(PUBLISH_DEADLINE):
        while not seen or not last(seen[-1]):
            seen.append(await socket.next())
    return seen


def is_final_update(msgid: str) -> Callable[[Doc], bool]:
    """A ``topic_update`` about ``msgid`` with nothing pending."""
    return lambda f: f["type"] == "topic_update" and f["msgid"] == msgid and f["pending"] == 0
