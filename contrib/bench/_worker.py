"""The load generator: one process, asyncio on uvloop, WebSockets from the ``websockets``
package's sans-I/O protocol.

Every socket is an :class:`asyncio.Protocol` around ``websockets.client.ClientProtocol``, and
every frame is handled synchronously in ``data_received``: a receipt frees a slot in the
sender's window and the next message goes out from that same callback; a delivery is checked
and acknowledged there too. No task, future or queue per frame — that is what makes one
process carry several times what the ``websockets`` asyncio client can (which spends ~50 µs of
CPU per frame), so that the daemon, not the generator, is what gets measured.

The harness starts it as ``python -m contrib.bench._worker`` and talks to it in JSON lines:
the first line on stdin is the spec; the worker answers ``{"event": "ready"}`` once every
socket is open and welcomed, then waits for ``{"cmd": "go", ...}`` with the run's timeline
(``time.monotonic()`` seconds, which every process on Linux shares), and prints
``{"event": "result", ...}`` at the end. The drain scenario adds ``{"event": "down"}`` (every
socket was closed by the daemon) and ``{"cmd": "reconnect", "url": ...}``.

Modes:

* ``relay`` — sender→recipient pairs speaking relayd's protocol. A sender keeps at most
  ``window`` messages outstanding (sent, no final receipt yet: ``acknowledged`` with
  ``acknowledge: true``, ``delivered`` without), or sends open-loop at ``rate`` msgs/s. The
  recipient acknowledges what asks for it. Every message is checked: its content names its
  sender, recipient and sequence number (and carries its send time, for latency); anything
  lost, duplicated without ``redelivered: true``, misrouted or out of order is counted.
* ``echo`` — the same frames against a bare echo server: the stack's ceiling.
* ``idle`` — authenticated sockets that only answer heartbeats; counts the pings they see.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

ACCEPTED = frozenset({"queued_offline", "queued", "pending_ack"})
FINAL_OK = frozenset({"acknowledged", "delivered"})
FINAL = FINAL_OK | {"failed", "expired"}

# '"' and '\\' never appear in what is interpolated here (uuids, digits, 'x'): valid JSON.
MESSAGE = (
    '{"type":"message","to":"%s","from":"%s","msgid":"%d-%d","acknowledge":%s,'
    '"msgno":%d,"content":"%s"}'
)
# The seed's first version requires all 13 fields, and uuids for from, to and msgid.
SEED_MESSAGE = (
    '{"type":"message","to":"%s","from":"%s","timestamp":0.0,"priority":"normal",'
    '"subject":"","msgid":"%s","acknowledge":false,"content":"%s","action":"","event":"",'
    '"status":"","conversation_id":"","msgno":%d}'
)
ACK = '{"type":"ack","msgid":"%s"}'
PONG = '{"type":"pong"}'
PING = '{"type":"ping"}'

# Bytes of a close handshake's grace before the socket is just dropped.
CLOSE_GRACE = 2.0


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def read_command() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise SystemExit("worker: stdin closed")
    doc: dict[str, Any] = json.loads(line)
    return doc


class Counters:
    frames_in = 0
    frames_out = 0


COUNTERS = Counters()


# --- the socket ----------------------------------------------------------------------------------


class HandshakeFailed(Exception):
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class WsConn(asyncio.Protocol):
    """A client WebSocket whose text frames go to ``on_text`` as they are parsed.

    ``opened`` resolves once the handshake succeeds (or fails); ``on_close`` is called once,
    with the close code the server sent (``None`` if it sent none), when the TCP connection
    is gone.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        on_text: Callable[[str], None],
        on_close: Callable[[int | None], None] | None = None,
        subprotocols: list[Subprotocol] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.proto = ClientProtocol(parse_uri(url), max_size=2**20, subprotocols=subprotocols)
        self.token = token
        self.on_text = on_text
        self.on_close = on_close
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.pings = 0
        self._close_timer: asyncio.TimerHandle | None = None
        # A handshake may fail after its caller stopped waiting: not worth a warning.
        self.opened.add_done_callback(_retrieve)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        request = self.proto.connect()
        if self.token is not None:
            request.headers["Authorization"] = f"Bearer {self.token}"
        self.proto.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    COUNTERS.frames_in += 1
                    self.on_text(str(event.data, "utf-8"))
                elif event.opcode is Opcode.PING:
                    self.pings += 1  # the protocol queues the pong itself
            elif not self.opened.done():  # the handshake response
                exc = self.proto.handshake_exc
                if exc is None:
                    self.opened.set_result(None)
                else:
                    self.opened.set_exception(HandshakeFailed(repr(exc)))
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.receive_eof()
        if self._close_timer is not None:
            self._close_timer.cancel()
        code = self.proto.close_rcvd.code if self.proto.close_rcvd is not None else None
        if not self.opened.done():
            self.opened.set_exception(HandshakeFailed(f"connection lost: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(code)
            if self.on_close is not None:
                self.on_close(code)

    # ours

    @property
    def is_open(self) -> bool:
        return self.proto.state is State.OPEN

    def send_text(self, text: str) -> bool:
        """Queue a text frame; ``False`` if the socket is no longer open."""
        if self.proto.state is not State.OPEN:
            return False
        self.proto.send_text(text.encode())
        COUNTERS.frames_out += 1
        self._flush()
        return True

    def close(self) -> None:
        if self.proto.state is State.OPEN:
            self.proto.send_close(1000)
            self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.proto.close_expected() and self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.close)


async def open_ws(
    url: str,
    token: str | None,
    on_text: Callable[[str], None],
    on_close: Callable[[int | None], None] | None = None,
    *,
    rcvbuf: int | None = None,
    within: float = 30.0,
    subprotocols: list[Subprotocol] | None = None,
) -> WsConn:
    """Connect and complete the handshake (authenticated by a bearer header if ``token``),
    offering ``subprotocols``."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = None
    if rcvbuf is not None:
        # A small receive buffer makes a stalled reader push back on the server quickly.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    conn = WsConn(url, token, on_text, on_close, subprotocols)
    if sock is not None:
        await loop.create_connection(lambda: conn, sock=sock)
    else:
        await loop.create_connection(lambda: conn, host, port)
    try:
        await asyncio.wait_for(asyncio.shield(conn.opened), within)
    except BaseException:
        conn.abort()
        raise
    return conn


# --- timing --------------------------------------------------------------------------------------


class Timeline:
    """The run's phases: ``bounds`` [b0, b1, ..., bn] (monotonic seconds) make n phases;
    events before b0 (warm-up) or after bn are not counted. This process's CPU time and
    frame counters are sampled at every bound."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds_ns = [int(b * 1e9) for b in bounds]
        self.first = self.bounds_ns[0]
        self.last = self.bounds_ns[-1]
        self.samples: list[dict[str, float]] = []

    def phase(self, now_ns: int) -> int:
        if now_ns < self.first or now_ns >= self.last:
            return -1
        return bisect.bisect_right(self.bounds_ns, now_ns) - 1

    async def sample(self) -> None:
        for bound in self.bounds_ns:
            delay = (bound - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            self.samples.append(
                {
                    "t": time.monotonic(),
                    "cpu": time.process_time(),
                    "frames_in": COUNTERS.frames_in,
                    "frames_out": COUNTERS.frames_out,
                }
            )


class Recorder:
    """Deliveries and their latencies (µs) per (group, phase)."""

    def __init__(self, timeline: Timeline | None) -> None:
        self.timeline = timeline
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latencies: dict[tuple[str, int], list[int]] = collections.defaultdict(list)

    def delivered(self, group: str, sent_ns: int, now_ns: int) -> None:
        if self.timeline is None:
            return
        phase = self.timeline.phase(now_ns)
        if phase >= 0:
            key = (group, phase)
            self.counts[key] += 1
            self.latencies[key].append((now_ns - sent_ns) // 1000)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": [[g, p, n] for (g, p), n in self.counts.items()],
            "latencies_us": [[g, p, v] for (g, p), v in self.latencies.items()],
        }


# --- relay ---------------------------------------------------------------------------------------


class Peer:
    """One client: its socket (reopened after the daemon closes it) and its frame handler."""

    def __init__(
        self, gen: RelayGenerator, uuid: str, token: str, rcvbuf: int | None, role: str
    ) -> None:
        self.gen = gen
        self.role = role
        self.keep_rcvbuf = False
        self.stalled = False  # this socket has been made to stop reading
        self.uuid = uuid
        self.token = token
        self.rcvbuf = rcvbuf
        self.conn: WsConn | None = None
        self.handler: Callable[[str], None] = lambda text: None
        self.on_up: Callable[[], None] = lambda: None
        self.closes: collections.Counter[str] = collections.Counter()
        self.connects = 0
        self._welcome: asyncio.Future[None] | None = None

    async def open(self, url: str) -> None:
        self._welcome = asyncio.get_running_loop().create_future()
        self._welcome.add_done_callback(_retrieve)
        token: str | None = self.token
        if self.gen.seed_v1:  # the seed reads the token from the URL only
            url, token = f"{url}?token={self.token}", None
        conn = await open_ws(
            url,
            token,
            self._on_text,
            self._on_close,
            rcvbuf=self.rcvbuf,
            subprotocols=self.gen.subprotocols,
        )
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), 30)
        except BaseException:
            conn.abort()
            raise
        self.conn = conn
        self.connects += 1
        # The small receive buffer is for the stall only: a reopened socket reads at speed
        # (a 4 KiB window over loopback trickles at ~20 frames/s).
        if not self.keep_rcvbuf:
            self.rcvbuf = None
        self.on_up()

    def _on_text(self, text: str) -> None:
        welcome = self._welcome
        if welcome is not None and not welcome.done():
            doc = json.loads(text)
            if doc.get("type") == "connection" and doc.get("uuid") == self.uuid:
                welcome.set_result(None)
            else:
                welcome.set_exception(RuntimeError(f"unexpected first frame: {text[:200]}"))
            return
        try:
            self.handler(text)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # A frame the generator could not make sense of: a finding, not a stop.
            self.gen.anomaly("unreadable_frame", f"{exc!r}: {text[:300]}")

    def _on_close(self, code: int | None) -> None:
        self.closes[str(code)] += 1
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(HandshakeFailed(f"closed before the welcome: {code}"))
        was_up = self.conn is not None
        self.conn = None
        if was_up:
            self.gen.peer_closed(self, code)

    def send(self, text: str) -> bool:
        conn = self.conn
        return conn is not None and conn.send_text(text)


class Pair:
    def __init__(self, gen: RelayGenerator, spec: dict[str, Any]) -> None:
        self.gen = gen
        self.idx: int = spec["idx"]
        self.group: str = spec.get("group", "main")
        s_uuid, s_token = spec["sender"]
        r_uuid, r_token = spec["recipient"]
        self.sender = Peer(gen, s_uuid, s_token, rcvbuf=None, role="sender")
        self.recipient = Peer(gen, r_uuid, r_token, rcvbuf=spec.get("rcvbuf"), role="recipient")
        self.sender.handler = self.on_sender_frame
        self.sender.on_up = self.sender_up
        self.recipient.handler = self.on_recipient_frame
        self.recipient.on_up = self.recipient_up
        self.rate: float | None = spec.get("rate")
        self.stall: tuple[float, float] | None = (
            (spec["stall_at"], spec["stall_at"] + spec["stall_for"]) if "stall_at" in spec else None
        )
        self.stalling = False
        # Keep the small receive buffer after the stall: a consumer on a slow link.
        self.keep_rcvbuf: bool = spec.get("keep_rcvbuf", False)
        self.recipient.keep_rcvbuf = self.keep_rcvbuf
        self.window: int = gen.window
        self.ack: bool = spec.get("ack", gen.ack)
        self.ack_literal = "true" if self.ack else "false"
        self.next_seq = 1
        self.sent: dict[int, int] = {}  # seq -> send time (monotonic ns)
        self.accepted: set[int] = set()  # a receipt said it was stored / being delivered
        self.final: dict[int, str] = {}
        self.received: set[int] = set()
        self.resent: set[int] = set()
        self.max_first = 0
        self.outstanding = 0
        self.started_ns = 0
        self.timer: asyncio.TimerHandle | None = None

    # --- the sender ----------------------------------------------------------------------

    def msgid(self, seq: int) -> str:
        if self.gen.seed_v1:
            return f"{self.idx:08x}-0000-4000-8000-{seq:012x}"
        return f"{self.idx}-{seq}"

    def seq_of(self, msgid: Any) -> int:
        """The seq of one of this pair's msgids; -1 if it is not one."""
        text = str(msgid)
        if self.gen.seed_v1:
            idx, _, seq = text.partition("-0000-4000-8000-")
            ok = len(idx) == 8 and len(seq) == 12 and int(idx, 16) == self.idx
            return int(seq, 16) if ok else -1
        idx, _, seq_text = text.partition("-")
        return int(seq_text) if idx == str(self.idx) and seq_text.isdigit() else -1

    def frame(self, seq: int, sent_ns: int) -> str:
        s_uuid, r_uuid = self.sender.uuid, self.recipient.uuid
        head = f"{s_uuid}>{r_uuid}#{seq}@{sent_ns}|"
        content = head + "x" * (self.gen.content_size - len(head))
        if self.gen.seed_v1:
            return SEED_MESSAGE % (r_uuid, s_uuid, self.msgid(seq), content, seq)
        return MESSAGE % (r_uuid, s_uuid, self.idx, seq, self.ack_literal, seq, content)

    def start(self) -> None:
        self.started_ns = time.monotonic_ns()
        self.pump()

    def _send_next(self, stamp_ns: int) -> bool:
        """Send the next message, stamped with ``stamp_ns``: when it went out (closed loop) or
        was due (open loop). Latencies are measured from the stamp."""
        seq = self.next_seq
        if not self.sender.send(self.frame(seq, stamp_ns)):
            return False
        self.next_seq += 1
        self.sent[seq] = stamp_ns
        self.outstanding += 1
        return True

    def pump(self) -> None:
        """Send what the window (or the rate) allows now."""
        gen = self.gen
        if not gen.sending or self.sender.conn is None:
            return
        now_ns = time.monotonic_ns()
        if now_ns >= gen.stop_ns:
            return
        if self.rate is None:
            while self.outstanding < self.window:
                if not self._send_next(now_ns):
                    return
            return
        # Open loop: everything due by now, then a timer for the next one. A message carries
        # the time it was due, not the time it went out: a generator (or a relay) that falls
        # behind shows in the latencies instead of hiding in a lower rate.
        interval_ns = 1e9 / self.rate
        while (due_ns := self.started_ns + int((self.next_seq - 1) * interval_ns)) <= now_ns:
            if not self._send_next(due_ns):
                return
        if self.timer is None or self.timer.cancelled():
            delay = (self.started_ns + (self.next_seq - 1) * interval_ns - now_ns) / 1e9
            self.timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self.timer = None
        self.pump()

    def sender_up(self) -> None:
        if self.gen.started:
            self.resend_unconfirmed()
            self.pump()

    def resend_unconfirmed(self) -> int:
        """Send again, with the same msgid, what no receipt has answered — what a client does
        after a reconnect: relayd must deduplicate what it had already taken."""
        count = 0
        for seq, sent_ns in sorted(self.sent.items()):
            if seq in self.accepted or seq in self.final:
                continue
            if not self.sender.send(self.frame(seq, sent_ns)):
                break
            self.resent.add(seq)
            count += 1
        self.gen.info["resent"] += count
        return count

    def on_sender_frame(self, text: str) -> None:
        gen = self.gen
        doc = json.loads(text)
        kind = doc.get("type")
        if kind == "sent" and gen.seed_v1:  # the seed's only receipt: handed to the recipient
            seq = self.seq_of(doc.get("msgid"))
            if seq not in self.sent or seq in self.final:
                gen.anomaly("receipt_for_unknown_msgid", doc)
                return
            self.final[seq] = "delivered"
            self.outstanding -= 1
            self.pump()
        elif kind == "delivery_status" or kind == "delivery_update":
            idx, _, seq_text = str(doc.get("msgid")).partition("-")
            seq = int(seq_text) if seq_text.isdigit() else -1
            if idx != str(self.idx) or seq not in self.sent:
                gen.anomaly("receipt_for_unknown_msgid", doc)
                return
            if doc.get("to") != self.recipient.uuid:
                gen.anomaly("receipt_misrouted", doc)
            if doc.get("duplicate"):
                if seq in self.resent:
                    gen.info["duplicate_receipts_for_resent"] += 1
                else:
                    gen.anomaly("duplicate_receipt_for_message_sent_once", doc)
            status = doc.get("status")
            if status in ACCEPTED:
                repeated = kind == "delivery_status" and seq in self.accepted
                if (seq in self.final or repeated) and seq not in self.resent:
                    gen.anomaly("receipt_out_of_order", doc)
                self.accepted.add(seq)
            elif status in FINAL:
                if seq in self.final:
                    # Receipts are at least once: after a restart one may come twice.
                    gen.info["final_receipt_repeated"] += 1
                    return
                if kind == "delivery_update" and seq not in self.accepted:
                    if gen.subprotocols is not None and status != "delivered":
                        pass  # the lean profile: the final status is the only receipt
                    elif gen.reconnect == "command" or seq in self.resent:
                        # Its first receipt was lost with the connection: told now.
                        gen.info["update_without_status"] += 1
                    else:
                        gen.anomaly("update_without_status", doc)
                final = status
                if status == "failed" and doc.get("reason") == "connection_lost":
                    final = "failed:connection_lost"
                self.final[seq] = final
                if status not in FINAL_OK:
                    gen.info[f"final_{final}"] += 1
                elif (status == "delivered") == self.ack:
                    gen.anomaly("final_status_unexpected", doc)
                self.outstanding -= 1
                self.pump()
            elif status == "accepted" and doc.get("duplicate"):
                # A re-sent message whose original relayd has not answered yet: it confirms
                # nothing (not stored yet); the original's receipt is still to come.
                gen.info["duplicate_status_accepted"] += 1
            else:
                gen.anomaly("unknown_status", doc)
        elif kind == "error":
            error = doc.get("error") or {}
            gen.errors[str(error.get("code"))] += 1
            msgid = str((error.get("details") or {}).get("msgid", ""))
            idx, _, seq_text = msgid.partition("-")
            if idx == str(self.idx) and seq_text.isdigit() and int(seq_text) not in self.final:
                self.final[int(seq_text)] = "error:" + str(error.get("code"))
                self.outstanding -= 1
                self.pump()
        else:
            reply = gen.on_other(doc)
            if reply is not None:
                self.sender.send(reply)

    # --- the recipient -------------------------------------------------------------------

    def on_recipient_frame(self, text: str) -> None:
        gen = self.gen
        now_ns = time.monotonic_ns()
        doc = json.loads(text)
        kind = doc.get("type")
        if kind == "message":
            content = str(doc.get("content"))
            route, _, rest = content.partition("#")
            s_uuid, _, r_uuid = route.partition(">")
            seq_text, _, rest = rest.partition("@")
            sent_text = rest.partition("|")[0]
            me = self.recipient.uuid
            seq = int(seq_text) if seq_text.isdigit() else -1
            if (
                r_uuid != me
                or doc.get("to") != me
                or s_uuid != self.sender.uuid
                or doc.get("from") != s_uuid
                or doc.get("msgid") != self.msgid(seq)
                or len(content) != gen.content_size
                or seq not in self.sent
            ):
                gen.anomaly("misrouted_or_corrupt", doc)
            else:
                redelivered = doc.get("redelivered") is True
                if seq in self.received:
                    if redelivered:
                        gen.info["redelivered_duplicates"] += 1
                    else:
                        gen.anomaly("duplicate_not_marked_redelivered", doc)
                else:
                    self.received.add(seq)
                    if redelivered:
                        gen.info["first_seen_as_redelivery"] += 1
                    elif seq < self.max_first:
                        gen.anomaly("first_delivery_out_of_order", doc)
                    else:
                        self.max_first = seq
                    gen.recorder.delivered(self.group, int(sent_text), now_ns)
                    if self.group != "main":
                        gen.arrivals[self.group][int((now_ns - gen.t0_ns) / 1e9)] += 1
            if doc.get("acknowledge") is True:
                self.recipient.send(ACK % doc.get("msgid"))
        elif kind == "ack_received":
            if doc.get("status") != "acknowledged":
                gen.info["ack_received_" + str(doc.get("status"))] += 1
        elif kind == "error":
            error = doc.get("error") or {}
            gen.errors[str(error.get("code"))] += 1
        else:
            reply = gen.on_other(doc)
            if reply is not None:
                self.recipient.send(reply)

    def recipient_up(self) -> None:
        if self.stalling:
            self._pause(True)

    def arm_stall(self) -> None:
        if self.stall is None:
            return
        loop = asyncio.get_running_loop()
        start, end = self.stall
        loop.call_later(max(0.0, start - time.monotonic()), self._set_stall, True)
        loop.call_later(max(0.0, end - time.monotonic()), self._set_stall, False)

    def _set_stall(self, on: bool) -> None:
        self.stalling = on
        if on:
            self.recipient.stalled = True
        self._pause(on)
        self.gen.info["stall_started" if on else "stall_ended"] += 1

    def _pause(self, on: bool) -> None:
        conn = self.recipient.conn
        if conn is not None and conn.transport is not None:
            if on:
                conn.transport.pause_reading()
            else:
                # Give the socket its buffer back: a 4 KiB window over loopback trickles at
                # ~20 frames/s (Nagle and delayed acks), which would make it slow for good.
                sock = conn.transport.get_extra_info("socket")
                if sock is not None and self.recipient.connects == 1 and not self.keep_rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                conn.transport.resume_reading()

    # --- the end -------------------------------------------------------------------------

    def complete(self) -> bool:
        """Every message sent is final, and every one the relay delivered has arrived."""
        if len(self.final) < len(self.sent):
            return False
        return all(
            status not in FINAL_OK or seq in self.received for seq, status in self.final.items()
        )

    def outcome(self) -> dict[str, int]:
        ok = {s for s, st in self.final.items() if st in FINAL_OK}
        confirmed = self.accepted | ok
        unsure = {s for s, st in self.final.items() if st == "failed:connection_lost"}
        lost = [s for s in confirmed if s not in self.received and s not in unsure]
        unconfirmed = [s for s in self.sent if s not in self.accepted and s not in self.final]
        return {
            "sent": len(self.sent),
            "confirmed": len(confirmed),
            "received": len(self.received),
            "lost": len(lost),
            "unconfirmed": len(unconfirmed),
            "not_final": sum(1 for s in self.accepted if s not in self.final),
            "failed": sum(1 for st in self.final.values() if st not in FINAL_OK),
            "resent": len(self.resent),
        }


class RelayGenerator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.url: str = spec["url"]
        self.window: int = spec.get("window", 10)
        self.ack: bool = spec.get("ack", True)
        self.content_size: int = spec.get("content_size", 256)
        # The lean receipt profile: no pending_ack receipts, no ack_received.
        self.subprotocols = [Subprotocol("relayd.v1.lean")] if spec.get("lean") else None
        # Against the seed's first version: its message format and its "sent" receipt.
        self.seed_v1: bool = spec.get("seed_v1", False)
        self.reconnect: str = spec.get("reconnect", "auto")  # or "command" (drain)
        self.settle: float = spec.get("drain_timeout", 30.0)
        self.errors: collections.Counter[str] = collections.Counter()
        self.anomalies: collections.Counter[str] = collections.Counter()
        self.anomaly_samples: list[Any] = []
        self.info: collections.Counter[str] = collections.Counter()
        self.other: collections.Counter[str] = collections.Counter()
        self.recorder = Recorder(None)
        self.stop_ns = 0
        self.started = False
        self.sending = False
        self.pairs = [Pair(self, p) for p in spec["pairs"]]
        self.open_count = 0
        self.t0_ns = 0
        # First deliveries per second since t0, for the groups other than "main".
        self.arrivals: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter
        )
        self.down = asyncio.Event()
        self.new_url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    def anomaly(self, kind: str, doc: Any) -> None:
        self.anomalies[kind] += 1
        if len(self.anomaly_samples) < 10:
            self.anomaly_samples.append([kind, doc])

    def on_other(self, doc: dict[str, Any]) -> str | None:
        kind = str(doc.get("type"))
        self.other[kind] += 1
        return PONG if kind == "ping" else None

    def peer_closed(self, peer: Peer, code: int | None) -> None:
        self.open_count -= 1
        if self.reconnect == "command":
            if self.open_count == 0:
                self.down.set()
        elif code is None and peer.stalled:
            # A socket cut because it did not drain cannot carry the close frame (4008).
            self.info["stalled_socket_closed_without_close_frame"] += 1
        elif code not in (1000, 1001, 4008):
            self.anomaly("unexpected_close", {"code": code, "uuid": peer.uuid, "role": peer.role})
        task = asyncio.get_running_loop().create_task(self._reopen(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reopen(self, peer: Peer) -> None:
        if self.reconnect == "command":
            url = await self.new_url
        else:
            url = self.url
            await asyncio.sleep(0.05)
        for _attempt in range(100):
            try:
                await peer.open(url)
            except (OSError, HandshakeFailed, RuntimeError, TimeoutError):
                self.info["reconnect_failures"] += 1
                await asyncio.sleep(0.2)
                continue
            self.open_count += 1
            self.info["reconnects"] += 1
            return
        self.anomaly("cannot_reconnect", {"uuid": peer.uuid})

    async def run(self) -> None:
        started = time.monotonic()
        sem = asyncio.Semaphore(64)

        async def open_peer(peer: Peer) -> None:
            async with sem:
                await peer.open(self.url)

        peers = [p for pair in self.pairs for p in (pair.sender, pair.recipient)]
        await asyncio.gather(*(open_peer(p) for p in peers))
        self.open_count = len(peers)
        emit({"event": "ready", "connect_s": time.monotonic() - started})
        go = await read_command()
        timeline = Timeline(go["phases"])
        self.recorder = Recorder(timeline)
        self.stop_ns = int(go["stop"] * 1e9)
        self.t0_ns = int(go["t0"] * 1e9)
        for pair in self.pairs:
            if pair.stall is not None:
                pair.stall = (go["t0"] + pair.stall[0], go["t0"] + pair.stall[1])
        await asyncio.sleep(max(0.0, go["t0"] - time.monotonic()))
        sampler = asyncio.create_task(timeline.sample())
        self.started = self.sending = True
        for pair in self.pairs:
            pair.arm_stall()
            pair.start()
        down_info: dict[str, Any] | None = None
        if self.reconnect == "command":
            await self.down.wait()
            self.sending = False
            down_info = {
                "t": time.monotonic(),
                "outstanding": sum(p.outstanding for p in self.pairs),
                "sent": sum(len(p.sent) for p in self.pairs),
            }
            emit({"event": "down", **down_info})
            command = await read_command()
            reopened = time.monotonic()
            self.new_url.set_result(command["url"])
            while self.open_count < len(peers):  # noqa: ASYNC110 - a count, not an event
                await asyncio.sleep(0.01)
            down_info["reconnect_s"] = time.monotonic() - reopened
            down_info["resent"] = self.info["resent"]
        else:
            await asyncio.sleep(max(0.0, self.stop_ns / 1e9 - time.monotonic()))
        self.sending = False
        stopped = time.monotonic()
        deadline = stopped + self.settle
        # Polled: "complete" is a predicate over every pair, cheap to check 50 times a second.
        while time.monotonic() < deadline and not all(p.complete() for p in self.pairs):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        settle_s = time.monotonic() - stopped
        if not sampler.done():
            sampler.cancel()
        groups: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        closes: collections.Counter[str] = collections.Counter()
        for pair in self.pairs:
            groups[pair.group].update(pair.outcome())
            for peer in (pair.sender, pair.recipient):
                for code, n in peer.closes.items():
                    closes[f"{pair.group} {peer.role} {code}"] += n
        emit(
            {
                "event": "result",
                "mode": "relay",
                "samples": timeline.samples,
                **self.recorder.to_json(),
                "groups": {g: dict(c) for g, c in groups.items()},
                "arrivals": {g: sorted(c.items()) for g, c in self.arrivals.items()},
                "errors": dict(self.errors),
                "anomalies": dict(self.anomalies),
                "anomaly_samples": self.anomaly_samples,
                "info": dict(self.info),
                "other_frames": dict(self.other),
                "closes": dict(closes),
                "settle_s": settle_s,
                "complete": all(p.complete() for p in self.pairs),
                "down": down_info,
                "cpu_total": time.process_time(),
            }
        )
        for peer in peers:
            if peer.conn is not None:
                peer.conn.abort()


# --- echo ----------------------------------------------------------------------------------------


class EchoClient:
    """Keeps ``window`` frames in flight to an echo server; checks each comes back once."""

    def __init__(self, idx: int, window: int, pad: int, recorder: Recorder) -> None:
        self.idx = idx
        self.window = window
        self.pad = pad
        self.recorder = recorder
        self.conn: WsConn | None = None
        self.in_flight: set[int] = set()
        self.seq = 0
        self.stop_ns = 0
        self.anomalies: collections.Counter[str] = collections.Counter()

    def on_text(self, text: str) -> None:
        now_ns = time.monotonic_ns()
        # The frame is the one we sent: no need to parse all of it.
        at = text.index("@")
        seq = int(text[text.index("#", 0, at) + 1 : at])
        sent_ns = int(text[at + 1 : text.index("|", at)])
        if seq not in self.in_flight:
            self.anomalies["echo_unknown_or_repeated"] += 1
            return
        self.in_flight.discard(seq)
        self.recorder.delivered("echo", sent_ns, now_ns)
        self.pump()

    def on_close(self, code: int | None) -> None:
        if self.in_flight and time.monotonic_ns() < self.stop_ns:
            self.anomalies["echo_closed_early"] += 1

    def pump(self) -> None:
        conn = self.conn
        if conn is None:
            return
        now_ns = time.monotonic_ns()
        while len(self.in_flight) < self.window and now_ns < self.stop_ns:
            self.seq += 1
            head = f"echo-{self.idx}>echo#{self.seq}@{now_ns}|"
            content = head + "x" * (self.pad - len(head))
            self.in_flight.add(self.seq)
            conn.send_text(
                MESSAGE % ("echo", "echo", self.idx, self.seq, "true", self.seq, content)
            )


async def run_echo(spec: dict[str, Any]) -> None:
    url: str = spec["url"]
    clients = [
        EchoClient(i, spec["window"], spec.get("content_size", 256), Recorder(None))
        for i in range(spec["conns"])
    ]
    for client in clients:
        client.conn = await open_ws(url, None, client.on_text, client.on_close)
    emit({"event": "ready"})
    go = await read_command()
    timeline = Timeline(go["phases"])
    recorder = Recorder(timeline)
    stop_ns = int(go["stop"] * 1e9)
    await asyncio.sleep(max(0.0, go["t0"] - time.monotonic()))
    sampler = asyncio.create_task(timeline.sample())
    for client in clients:
        client.recorder = recorder
        client.stop_ns = stop_ns
        client.pump()
    await asyncio.sleep(max(0.0, go["stop"] - time.monotonic()))
    deadline = time.monotonic() + 10
    while any(c.in_flight for c in clients) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if not sampler.done():
        sampler.cancel()
    anomalies: collections.Counter[str] = collections.Counter()
    for client in clients:
        anomalies.update(client.anomalies)
        if client.in_flight:
            anomalies["echo_lost"] += len(client.in_flight)
        if client.conn is not None:
            client.conn.close()
    emit(
        {
            "event": "result",
            "mode": "echo",
            "samples": timeline.samples,
            **recorder.to_json(),
            "anomalies": dict(anomalies),
            "cpu_total": time.process_time(),
        }
    )
    await asyncio.sleep(0.2)


# --- idle ----------------------------------------------------------------------------------------


class IdleClient:
    def __init__(self, uuid: str, token: str) -> None:
        self.uuid = uuid
        self.token = token
        self.conn: WsConn | None = None
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.json_pings = 0
        self.probe: asyncio.Future[None] | None = None
        self.close_code: int | None = None
        self.closed = False
        self.attempt = 0  # callbacks of an abandoned attempt's socket are ignored
        self.other: collections.Counter[str] = collections.Counter()

    def on_text(self, text: str) -> None:
        doc = json.loads(text)
        kind = doc.get("type")
        if not self.welcomed.done():
            if kind == "connection" and doc.get("uuid") == self.uuid:
                self.welcomed.set_result(None)
            else:
                self.welcomed.set_exception(RuntimeError(f"first frame: {text[:200]}"))
        elif kind == "ping":
            self.json_pings += 1
            if self.conn is not None:
                self.conn.send_text(PONG)
        elif kind == "pong" and self.probe is not None and not self.probe.done():
            self.probe.set_result(None)
        else:
            self.other[str(kind)] += 1

    def on_close(self, code: int | None, attempt: int) -> None:
        if attempt != self.attempt:
            return
        self.closed = True
        self.close_code = code
        if not self.welcomed.done():
            self.welcomed.set_exception(HandshakeFailed(f"closed before the welcome: {code}"))


async def run_idle(spec: dict[str, Any]) -> None:
    url: str = spec["url"]
    clients = [IdleClient(uuid, token) for uuid, token in spec["clients"]]
    sem = asyncio.Semaphore(spec.get("concurrency", 100))
    failures: collections.Counter[str] = collections.Counter()
    connect_times: list[float] = []

    async def open_one(client: IdleClient) -> None:
        async with sem:
            t = time.monotonic()
            for attempt in range(1, 4):
                client.attempt = attempt
                client.welcomed = asyncio.get_running_loop().create_future()
                client.welcomed.add_done_callback(_retrieve)

                def on_close(code: int | None, attempt: int = attempt) -> None:
                    client.on_close(code, attempt)

                try:
                    conn = await open_ws(url, client.token, client.on_text, on_close, within=60)
                    client.conn = conn
                    await asyncio.wait_for(asyncio.shield(client.welcomed), 60)
                except (OSError, HandshakeFailed, RuntimeError, TimeoutError) as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                    if client.conn is not None:
                        client.conn.abort()
                    client.conn = None
                    client.attempt = 0
                    await asyncio.sleep(0.5)
                    continue
                connect_times.append(time.monotonic() - t)
                return

    started = time.monotonic()
    connecting = asyncio.gather(*(open_one(c) for c in clients))
    try:
        await asyncio.wait_for(connecting, spec.get("connect_within", 300.0))
    except TimeoutError:
        # Report what opened rather than nothing: a connect storm that does not converge is
        # a finding.
        failures["connect phase timed out"] += sum(1 for c in clients if c.conn is None)
    finished = time.monotonic()
    live = [c for c in clients if c.conn is not None]
    connect_times.sort()
    emit(
        {
            "event": "ready",
            "started": started,
            "finished": finished,
            "open": len(live),
            "failures": dict(failures),
            "connect_p50_ms": 1000 * connect_times[len(connect_times) // 2] if connect_times else 0,
            "connect_max_ms": 1000 * connect_times[-1] if connect_times else 0,
        }
    )
    go = await read_command()
    await asyncio.sleep(max(0.0, go["until"] - time.monotonic()))
    # Still alive? Each socket sends a ping frame and must get its pong.
    loop = asyncio.get_running_loop()
    probe_started = time.monotonic()

    probe_times: list[float] = []

    async def probe(client: IdleClient) -> bool:
        conn = client.conn
        if conn is None or client.closed:
            return False
        client.probe = loop.create_future()
        sent = time.monotonic()
        if not conn.send_text(PING):
            return False
        try:
            await asyncio.wait_for(client.probe, 60)
        except TimeoutError:
            return False
        probe_times.append(time.monotonic() - sent)
        return True

    alive = await asyncio.gather(*(probe(c) for c in live))
    probe_s = time.monotonic() - probe_started
    probe_times.sort()
    closes: collections.Counter[str] = collections.Counter(
        str(c.close_code) for c in live if c.closed
    )
    other: collections.Counter[str] = collections.Counter()
    for c in live:
        other.update(c.other)
    protocol_pings = [c.conn.pings for c in live if c.conn is not None]
    json_pings = [c.json_pings for c in live]
    emit(
        {
            "event": "result",
            "mode": "idle",
            "open": len(live),
            "alive": sum(alive),
            "probe_s": probe_s,
            "probe_p50_ms": 1000 * probe_times[len(probe_times) // 2] if probe_times else None,
            "probe_max_ms": 1000 * probe_times[-1] if probe_times else None,
            "closes": dict(closes),
            "other_frames": dict(other),
            "protocol_pings_min": min(protocol_pings, default=0),
            "protocol_pings_max": max(protocol_pings, default=0),
            "json_pings_min": min(json_pings, default=0),
            "json_pings_max": max(json_pings, default=0),
            "sockets_without_ping": sum(
                1 for c in live if c.json_pings == 0 and (c.conn is None or c.conn.pings == 0)
            ),
            "cpu_total": time.process_time(),
        }
    )
    # Stay connected while the harness stops the daemon (its drain is timed with every socket
    # open); leave when stdin closes.
    await asyncio.to_thread(sys.stdin.readline)
    for c in live:
        if c.conn is not None:
            c.conn.abort()


async def main() -> None:
    spec: dict[str, Any] = json.loads(sys.stdin.readline())
    mode = spec["mode"]
    if mode == "relay":
        await RelayGenerator(spec).run()
    elif mode == "echo":
        await run_echo(spec)
    elif mode == "idle":
        await run_idle(spec)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    uvloop.run(main())
