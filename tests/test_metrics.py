"""GET /metrics: Prometheus text whose counters move as two clients exchange messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from relayd._relay.frames import CloseCode

from .support import Engine, HttpClient, RunningRelayd, make_config, start_relayd
from .ws_support import ws_connect

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: HttpClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def exchange(relayd: RunningRelayd) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alice sends Bob one acknowledged and one fire-and-forget message; Bob acks."""
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await a.next()
        await b.next()
        await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True})
        await b.send({"type": "ack", "msgid": (await b.next())["msgid"]})
        await a.send({"to": bob["uuid"], "msgid": "m2"})
        assert (await b.next_of("message"))["msgid"] == "m2"
        statuses: set[str] = set()
        while statuses != {"pending_ack", "acknowledged", "delivered"}:
            statuses.add((await a.next())["status"])
    return alice, bob


async def test_counters_move_as_clients_exchange_messages(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path, engine=engine))
    before = await scrape(relayd.http)
    assert value(before, "relayd_messages_total", event="accepted") == 0
    assert value(before, "relayd_connections") == 0

    await exchange(relayd)
    async with ws_connect(relayd, "not-a-token") as refused:
        assert await refused.closed() == CloseCode.AUTH_FAILED
    assert (await relayd.http.get("/clients", token="garbage")).status == 401

    after = await scrape(relayd.http)
    assert value(after, "relayd_messages_total", event="accepted") == 2
    assert value(after, "relayd_messages_total", event="acknowledged") == 1
    assert value(after, "relayd_messages_total", event="delivered") == 1
    assert value(after, "relayd_messages_total", event="failed") == 0
    # In: 2 messages, 1 ack. Out: 2 welcomes, 2 deliveries, 3 receipts, 1 ack_received, and
    # the refused socket's error frame.
    assert value(after, "relayd_frames_total", direction="in") == 3
    assert value(after, "relayd_frames_total", direction="out") == 9
    assert value(after, "relayd_delivery_latency_seconds_count") == 2
    assert value(after, "relayd_ack_latency_seconds_count") == 1
    assert value(after, "relayd_store_commit_seconds_count") >= 1
    assert value(after, "relayd_auth_failures_total", via="ws", reason="token_invalid") == 1
    assert value(after, "relayd_auth_failures_total", via="http", reason="token_invalid") == 1
    # Accepted tokens by role: the two sockets; then one REST call and one operator's.
    assert value(after, "relayd_authentications_total", role="client") == 2
    assert value(before, "relayd_authentications_total", role="client") == 0
    assert (
        value(after, "relayd_http_requests_total", route="/register", method="POST", status="200")
        == 2
    )
    assert value(after, "relayd_queued_messages", where="store") == 0
    assert value(after, "relayd_sessions", state="active") == 0


async def test_queued_messages_show_in_the_store_gauge(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path, engine=engine))
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await a.next()
        for i in range(3):
            await a.send({"to": bob["uuid"], "msgid": f"m{i}", "acknowledge": True})
            assert (await a.next())["status"] == "queued_offline"
        samples = await scrape(relayd.http)
        assert value(samples, "relayd_queued_messages", where="store") == 3
        assert value(samples, "relayd_sessions", state="active") == 1


async def test_a_metrics_listener_keeps_metrics_off_the_client_port(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(
        nursery, make_config(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}}, engine)
    )
    assert relayd.addresses.metrics is not None
    assert (await relayd.http.get("/metrics")).status == 404
    metrics = HttpClient(*relayd.addresses.metrics)
    samples = await scrape(metrics)
    assert ("relayd_connections", ()) in samples
    assert (await metrics.get("/clients")).status == 404
