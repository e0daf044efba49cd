"""The client: one identity, one self-healing session, messages in and out.

Theory of operation. A :class:`Client` runs one task group with a *supervisor* task. The
supervisor loops: get an access token (:class:`TokenKeeper`), connect, wait for the welcome,
run the session, and when it ends ask the :class:`ReconnectPolicy` what to do (reconnect after
a delay, get a new token first, or stop for good). Each session runs three tasks in a task
group of its own:

* the **reader** is the session: it returns the close code when the connection ends. It feeds
  receipts to the :class:`Ledger`, messages to the inbox, token frames to the refresher;
* the **writer** writes acks first, then the ledger's owed messages in send order;
* the **refresher** renews the access token before it expires and hands it to relayd in band
  (a ``refresh`` frame), so that a session outlives its tokens.

Bounds and their policies (all sizes in :class:`ClientOptions`):

* inbox (``inbox_size``): messages received and not yet taken by the application. When full,
  the reader waits, so the client stops reading its socket; relayd then holds further
  messages for it, and after ``websocket.write_timeout`` drops the session as a slow consumer.
  Nothing is dropped: unacknowledged messages are delivered again on the next session.
* send window and tracking (``send_window``, ``max_tracked``): :meth:`Client.send` waits for
  room, up to its ``timeout``.
* pending acks (``max_pending_acks``): when full, the oldest ack is dropped (logged); relayd
  delivers that message again (at least once), and its new copy is acknowledged.

Every wait has a deadline: connecting (``connect_timeout``, welcome included), each write
(``write_timeout``), each REST call (``request_timeout``), the answer to an in-band refresh
(``refresh_timeout``), silence on the socket (``liveness_factor`` heartbeat intervals).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from attrs import define, field, frozen

from ._credentials import Credentials, CredentialStore
from ._errors import (
    AuthenticationError,
    ClientError,
    ConnectTimeout,
    HttpError,
    InvalidMessage,
    ReceiptTimeout,
    ServerUnreachable,
    SessionEnded,
)
from ._frames import (
    AckReceived,
    ErrorFrame,
    KeyChange,
    Message,
    Pong,
    ReadReceived,
    Receipt,
    Shutdown,
    TokenExpiring,
    TokenRefreshed,
    Unknown,
    Welcome,
    ack_frame,
    canonical_uuid,
    encode,
    message_frame,
    new_msgid,
    parse,
    read_frame,
    refresh_frame,
)
from ._ledger import Entry, Ledger
from ._policy import Action, ReconnectPolicy
from ._rest import DirectoryEntry, PeerKeys, RestClient
from ._tokens import TokenKeeper, refresh_due
from ._ws import Closed, HandshakeRejected, WebSocket, connect, websocket_url

log = logging.getLogger("relayd.client")

# Error frames that answer an in-band refresh with a refusal of the new token.
_TOKEN_ERRORS = frozenset(
    {"token_invalid", "token_expired", "token_not_yet_valid", "token_wrong_type", "token_revoked"}
)
# HTTP answers to the upgrade that no retry can fix: a wrong URL or a refused origin.
_FATAL_HANDSHAKE_STATUSES = frozenset({400, 403, 404, 405})


class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt
    STOPPED = "stopped"


@frozen(kw_only=True)
class ClientOptions:
    """Tunables of a :class:`Client`; the defaults suit relayd's defaults."""

    connect_timeout: float = 10.0
    """TCP, TLS, WebSocket handshake and welcome, together."""
    request_timeout: float = 10.0
    """Each REST call (log in, refresh, directory)."""
    write_timeout: float = 10.0
    """Each frame written; a socket that takes longer is dropped and the session restarts."""
    refresh_margin: float = 60.0
    """Renew the access token this long before it expires (or two thirds into its life, if
    later)."""
    refresh_timeout: float = 10.0
    """How long relayd has to answer an in-band ``refresh`` frame."""
    refresh_in_band: bool = True
    """False: never refresh a live session; relayd ends it at expiry (4001) and the client
    reconnects with a new token. For a relay in front of relayd that does not pass ``refresh``
    frames on; it costs a reconnect per token lifetime."""
    liveness_factor: float = 3.0
    """A socket silent (not even a ping) for this many heartbeat intervals is dead."""
    inbox_size: int = 256
    """Messages received and not yet taken by the application (then: stop reading)."""
    send_window: int = 256
    """Messages written and not yet answered by relayd (then: ``send()`` waits)."""
    max_tracked: int = 10_000
    """Sent messages awaiting their final receipt (then: ``send()`` waits)."""
    max_pending_acks: int = 1024
    """Acks waiting to be written (then: the oldest is dropped; relayd redelivers), and so
    many read receipts (then: the oldest is dropped)."""
    max_frame_bytes: int = 65_536
    """relayd's ``websocket.max_frame_bytes``: a larger message is refused by ``send()``."""
    max_incoming_chars: int = 1 << 20
    """A frame from relayd larger than this closes the session (1009)."""
    ws_path: str = "/ws"
    ssl_context: ssl.SSLContext | None = None
    policy: Callable[[], ReconnectPolicy] = ReconnectPolicy
    """Makes the reconnect policy (see :mod:`relayd.client._policy`)."""


class SendHandle:
    """A message sent: its receipts as they arrive, and its final one to await.

    >>> async def example(client: "Client", bob: str) -> None:
    ...     handle = await client.send(bob, "hello", acknowledge=True)
    ...     receipt = await handle.result(timeout=30)
    ...     print(receipt.status)  # "acknowledged"; handle.receipts has the earlier ones
    """

    def __init__(self, client: Client, entry: Entry, to: str, acknowledge: bool) -> None:
        self._client = client
        self._entry = entry
        self.msgid = entry.msgid
        self.to = to
        self.acknowledge = acknowledge
        self._changed = anyio.Event()

    @property
    def receipts(self) -> tuple[Receipt, ...]:
        """Every receipt so far, oldest first."""
        return tuple(self._entry.receipts)

    @property
    def latest(self) -> Receipt | None:
        return self._entry.receipts[-1] if self._entry.receipts else None

    @property
    def final(self) -> Receipt | None:
        """The final receipt, once it has come."""
        return self._entry.final

    async def accepted(self, timeout: float = 30.0) -> Receipt:
        """The first receipt: relayd has stored the message (``queued_offline``, ``queued``,
        ``pending_ack``, ``accepted``) or already settled it (a final receipt).

        Raises:
            ReceiptTimeout: none within ``timeout`` seconds (the handle keeps tracking).
            SessionEnded: the client stopped first.
        """
        receipt: Receipt = await self._wait(lambda: self.latest, timeout)
        return receipt

    async def result(self, timeout: float = 60.0) -> Receipt:
        """The final receipt: ``delivered``, ``acknowledged``, ``failed``, ``expired``, or
        ``rejected`` (relayd refused it: ``reason`` is ``unknown_recipient`` or
        ``queue_full``).

        Raises:
            ReceiptTimeout: none within ``timeout`` seconds (the handle keeps tracking).
            SessionEnded: the client stopped first.
        """
        receipt: Receipt = await self._wait(lambda: self.final, timeout)
        return receipt

    async def updates(self, timeout: float = 60.0) -> AsyncIterator[Receipt]:
        """Each receipt as it arrives (those already in, first), ending with the final one;
        ``timeout`` bounds the wait for each."""
        index = 0
        while True:
            receipts = self._entry.receipts
            while index < len(receipts):
                receipt = receipts[index]
                index += 1
                yield receipt
                if receipt.final:
                    return
            await self._wait(functools.partial(self._more_than, index), timeout)

    def _more_than(self, count: int) -> bool | None:
        return len(self._entry.receipts) > count or None

    async def _wait(self, ready: Callable[[], Any], timeout: float) -> Any:
        with anyio.move_on_after(timeout):
            while True:
                value = ready()
                if value is not None:
                    return value
                self._client._raise_if_stopped()
                await self._changed.wait()
        raise ReceiptTimeout(f"no receipt for {self.msgid} within {timeout} s")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


@define
class _Session:
    id: int
    ws: WebSocket
    welcome: Welcome
    liveness: float
    expiring: anyio.Event = field(factory=anyio.Event)
    refreshed: anyio.Event = field(factory=anyio.Event)
    refresh_error: ErrorFrame | None = None
    last_error: ErrorFrame | None = None


@frozen
class _Delivery:
    session: int
    message: Message


class Client:
    """A relayd client: register once, then connect, send and receive, across reconnects.

    Runs under asyncio and Trio (anyio). Use it as an async context manager::

        from relayd.client import Client, CredentialFile

        async def main() -> None:
            async with Client(CredentialFile("alice.json")) as alice:
                handle = await alice.send(bob_uuid, "hello")
                print((await handle.result()).status)
                async for message in alice.messages():
                    print(message.sender, message.content)  # acknowledged when the loop
                                                            # body is done

    ``on_receipt(receipt, handle)`` is called (synchronously, from the reader) for every
    receipt, ``handle`` None for a msgid this client did not send in this run (relayd owed
    it from an earlier one). ``on_state(state, detail)`` is called on every change of
    :class:`State`. ``on_key_changed(change)`` is called for every ``key_changed`` frame: a
    client whose keys this one read from the directory changed a key (see
    :class:`~relayd.client.EndToEnd`). None may block; an exception in one is logged, not
    raised.
    """

    def __init__(
        self,
        store: CredentialStore,
        *,
        options: ClientOptions | None = None,
        on_receipt: Callable[[Receipt, SendHandle | None], None] | None = None,
        on_state: Callable[[State, str], None] | None = None,
        on_key_changed: Callable[[KeyChange], None] | None = None,
    ) -> None:
        self._store = store
        self._key_listeners: list[Callable[[KeyChange], None]] = []
        if on_key_changed is not None:
            self._key_listeners.append(on_key_changed)
        self.options = options or ClientOptions()
        self._on_receipt = on_receipt
        self._on_state = on_state
        self._policy = self.options.policy()
        self._ledger = Ledger(window=self.options.send_window, capacity=self.options.max_tracked)
        self._handles: dict[str, SendHandle] = {}
        self._acks: collections.deque[str] = collections.deque()
        # Read receipts to write, (msgid, sender): kept across sessions (relayd answers a
        # repeated one already_read), bounded as the acks are.
        self._reads: collections.deque[tuple[str, str]] = collections.deque()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[_Delivery](
            self.options.inbox_size
        )
        self._session: _Session | None = None
        self._sessions = 0
        self._work = anyio.Event()  # the writer has something to do
        self._room = anyio.Event()  # the ledger has room again
        self._state_changed = anyio.Event()
        self.state = State.CONNECTING
        self._stop_error: SessionEnded | AuthenticationError | None = None
        self._closing = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._keeper: TokenKeeper | None = None
        self._rest: RestClient | None = None
        self._credentials: Credentials | None = None
        self._last_error_code = ""  # the last error frame's code, to say why a session ended

    # --- lifetime ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._inbox.close)
            stack.callback(self._inbox_send.close)
            await self._store.acquire()
            stack.push_async_callback(self._store.release)
            credentials = await self._store.load()
            self._credentials = credentials
            self._rest = RestClient(credentials.url, timeout=self.options.request_timeout)
            stack.push_async_callback(self._rest.aclose)
            self._keeper = TokenKeeper(self._store, self._rest, credentials)
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._shutdown, group)
            group.start_soon(self._supervise)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Write the acks already given (within ``write_timeout``), close the session (1000)
        and stop. Handles not yet final stay unresolved: awaiting them raises
        :class:`SessionEnded`. Cancelled, it drops the acks not yet written (relayd delivers
        those messages again) and still closes the connection."""
        await self.__aexit__(None, None, None)

    async def _shutdown(self, group: anyio.abc.TaskGroup) -> None:
        self._closing = True
        session = self._session
        if session is not None:
            # An ack given just before closing (the last message of a `listen --count`)
            # must not die in the queue, or its sender waits until this client comes back.
            await self._flush_acks(session)
            await session.ws.close(1000, "client closed")
        group.cancel_scope.cancel()
        self._stopped(SessionEnded("the client was closed"))

    # --- identity and state --------------------------------------------------------------------

    @property
    def credentials(self) -> Credentials:
        assert self._keeper is not None, "use the client in `async with`"
        return self._keeper.credentials

    @property
    def uuid(self) -> str:
        return self.credentials.uuid

    @property
    def name(self) -> str:
        return self.credentials.name

    @property
    def error(self) -> ClientError | None:
        """Why the client stopped, once it has."""
        return self._stop_error

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a session is up.

        Raises:
            ConnectTimeout: not within ``timeout`` seconds.
            SessionEnded, AuthenticationError: the client stopped for good.
        """
        with anyio.move_on_after(timeout):
            while self.state is not State.CONNECTED:
                self._raise_if_stopped()
                await self._state_changed.wait()
            return
        raise ConnectTimeout(f"no session with relayd within {timeout} s ({self.state.value})")

    def _set_state(self, state: State, detail: str = "") -> None:
        self.state = state
        self._state_changed.set()
        self._state_changed = anyio.Event()
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:
                log.exception("on_state callback failed")

    def _raise_if_stopped(self) -> None:
        if self._stop_error is not None:
            raise self._stop_error

    def _stopped(self, error: SessionEnded | AuthenticationError) -> None:
        if self._stop_error is None:
            self._stop_error = error
        self._inbox_send.close()
        self._set_state(State.STOPPED, str(self._stop_error))
        self._room.set()
        for handle in self._handles.values():
            handle._notify()

    # --- sending -------------------------------------------------------------------------------

    async def send(
        self,
        to: str,
        content: str = "",
        *,
        acknowledge: bool = True,
        msgid: str | None = None,
        subject: str = "",
        priority: str = "normal",
        conversation_id: str = "",
        action: str = "",
        event: str = "",
        status: str = "",
        msgno: int = 0,
        ttl: float | None = None,
        timeout: float = 30.0,
    ) -> SendHandle:
        """Send a direct message to client ``to``; return its handle at once (relayd has not
        answered yet). Sent while disconnected, it goes out when the next session is up; a
        message in flight when a session ends is sent again, with the same msgid.

        ``acknowledge=True`` (the default): at least once, the final receipt is
        ``acknowledged`` once the recipient's application has handled it.
        ``acknowledge=False``: at most once, final ``delivered`` when written to its socket.

        Raises:
            InvalidMessage: relayd would refuse it (a field, or its size).
            TimeoutError: no room within ``timeout`` seconds (too many messages in flight).
            SessionEnded: the client has stopped.
        """
        self._raise_if_stopped()
        frame = message_frame(
            to,
            content,
            msgid=msgid or new_msgid(),
            acknowledge=acknowledge,
            subject=subject,
            priority=priority,
            conversation_id=conversation_id,
            action=action,
            event=event,
            status=status,
            msgno=msgno,
            ttl=ttl,
        )
        size = len(encode(frame).encode("utf-8"))
        if size > self.options.max_frame_bytes:
            raise InvalidMessage(
                f"the message is {size} bytes as a frame; relayd takes at most"
                f" {self.options.max_frame_bytes}"
            )
        if frame["msgid"] in self._ledger:
            raise InvalidMessage(f"msgid: {frame['msgid']!r} is already being sent")
        with anyio.fail_after(timeout):
            while not self._ledger.room():
                self._raise_if_stopped()
                await self._room.wait()
        self._raise_if_stopped()
        entry = self._ledger.add(frame["msgid"], frame)
        handle = SendHandle(self, entry, frame["to"], acknowledge)
        self._handles[entry.msgid] = handle
        self._wake_writer()
        return handle

    def _wake_writer(self) -> None:
        self._work.set()

    # --- receiving -----------------------------------------------------------------------------

    def messages(self) -> MessageStream:
        """Incoming messages, as an async iterator. Each is acknowledged (if it asks for it)
        when the iterator is asked for the next one, that is once the loop body handling it
        is done, or earlier with :meth:`ack`. A body that raises leaves its message
        unacknowledged: relayd delivers it again (``redelivered`` true). The iteration ends
        when the client closes, and raises the client's error if it stopped for good."""
        return MessageStream(self)

    async def receive(self, timeout: float) -> Message:
        """The next incoming message (not acknowledged: call :meth:`ack` once handled).

        Raises:
            TimeoutError: none within ``timeout`` seconds.
            SessionEnded, AuthenticationError: the client stopped.
        """
        with anyio.fail_after(timeout):
            try:
                delivery = await self._inbox.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._raise_if_stopped()
                raise SessionEnded("the client was closed") from None
        return delivery.message

    async def serve(self, handler: Callable[[Message], Awaitable[None]]) -> None:
        """Call ``handler`` for each incoming message; acknowledge it after it returns. An
        exception from ``handler`` ends ``serve`` (the message stays unacknowledged)."""
        async for message in self.messages():
            await handler(message)

    def ack(self, message: Message) -> None:
        """Acknowledge ``message`` now (if it asked for an ack). Idempotent on relayd's side:
        an ack for a message already acknowledged is answered ``unknown``. Without a live
        session the ack is not sent: relayd delivers the message again."""
        if not message.acknowledge or self._session is None:
            return
        if len(self._acks) >= self.options.max_pending_acks:
            dropped = self._acks.popleft()
            log.warning("too many acks pending: dropped the ack of %s (relayd redelivers)", dropped)
        self._acks.append(message.msgid)
        self._wake_writer()

    def read(self, message: Message) -> None:
        """Tell ``message``'s sender that this client read it (a read receipt; relayd records
        it for this client either way, and tells the sender unless this client turned read
        receipts off). Written on the live session, or the next one; a repeat changes
        nothing. When ``max_pending_acks`` reads wait, the oldest is dropped (logged)."""
        if len(self._reads) >= self.options.max_pending_acks:
            dropped = self._reads.popleft()
            log.warning("too many reads pending: dropped the read receipt of %s", dropped[0])
        self._reads.append((message.msgid, message.sender))
        self._wake_writer()

    # --- the directory -------------------------------------------------------------------------

    async def directory(self) -> list[DirectoryEntry]:
        """Every registered client (``GET /clients``)."""
        assert self._rest is not None
        entries: list[DirectoryEntry] = await self._authorized(self._rest.directory)
        return entries

    async def _authorized(self, call: Callable[[str], Awaitable[Any]]) -> Any:
        """``call(access_token)``, once more with a renewed token if relayd answers 401."""
        assert self._keeper is not None
        token = await self._keeper.access_token(self.options.refresh_margin)
        try:
            return await call(token)
        except HttpError as exc:
            if exc.status != 401:
                raise
            return await call(await self._keeper.renew())

    # --- the key directory ---------------------------------------------------------------------

    async def publish_keys(self, keys: Mapping[str, bytes]) -> tuple[PeerKeys, tuple[str, ...]]:
        """Publish this client's public ``keys`` (algorithm -> raw bytes) in the directory:
        its keys as listed now, and the algorithms whose key changed (see
        :class:`~relayd.client.EndToEnd` for a helper that keeps the private half)."""
        assert self._rest is not None
        rest = self._rest
        result: tuple[PeerKeys, tuple[str, ...]] = await self._authorized(
            lambda token: rest.publish_keys(token, self.uuid, keys)
        )
        return result

    async def peer_keys(self, peer: str) -> PeerKeys:
        """The keys ``peer`` (a uuid, or the name of one client) published. Reading them
        makes this client one of its correspondents: told (``on_key_changed``) when it changes
        a key."""
        assert self._rest is not None
        rest = self._rest
        uuid = await self.resolve(peer)
        keys: PeerKeys = await self._authorized(lambda token: rest.keys(token, uuid))
        return keys

    def _listen_key_changes(self, listener: Callable[[KeyChange], None]) -> None:
        """Call ``listener`` too for every ``key_changed`` frame (the e2e helper's hook)."""
        self._key_listeners.append(listener)

    async def resolve(self, peer: str) -> str:
        """The uuid of ``peer``: a uuid, or the name of exactly one registered client.

        Raises:
            InvalidMessage: no client, or several, has that name.
        """
        with contextlib.suppress(InvalidMessage):
            return canonical_uuid(peer)
        matches = [entry.uuid for entry in await self.directory() if entry.name == peer]
        if len(matches) != 1:
            found = "no client" if not matches else f"{len(matches)} clients"
            raise InvalidMessage(f"{found} named {peer!r}: give its uuid")
        return matches[0]

    # --- the supervisor ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        reauthenticate = False
        while True:
            code: int | None = None
            wait_at_least = 0.0
            try:
                if reauthenticate:
                    assert self._keeper is not None
                    await self._keeper.renew()
                code = await self._connect_and_run()
            except AuthenticationError as exc:
                self._stopped(exc)
                return
            except HttpError as exc:
                log.warning("relayd refused a token request: %s", exc)
                wait_at_least = exc.retry_after or 0.0
            except ServerUnreachable as exc:
                log.info("%s", exc)
            except HandshakeRejected as exc:
                if exc.status in _FATAL_HANDSHAKE_STATUSES:
                    self._stopped(SessionEnded(str(exc), reason=f"http_{exc.status}"))
                    return
                log.info("%s", exc)
            decision = self._policy.closed(code, anyio.current_time())
            if decision.action is Action.STOP:
                self._stopped(self._ended(code, decision.reason))
                return
            reauthenticate = decision.action is Action.REAUTHENTICATE
            delay = max(decision.delay, wait_at_least)
            log.info("reconnecting in %.1f s: %s", delay, decision.reason)
            self._set_state(State.WAITING, f"{decision.reason}; reconnecting in {delay:.1f} s")
            await anyio.sleep(delay)

    def _ended(self, code: int | None, reason: str) -> SessionEnded:
        error = self._last_error_code
        detail = f" ({error})" if error else ""
        return SessionEnded(f"relayd ended the session: {reason}{detail}", code=code, reason=error)

    async def _connect_and_run(self) -> int | None:
        """One session: connect, welcome, run until it closes; return its close code (None:
        no session came up)."""
        assert self._keeper is not None
        assert self._credentials is not None
        self._set_state(State.CONNECTING)
        token = await self._keeper.access_token(self.options.refresh_margin)
        url = websocket_url(self._credentials.url, self.options.ws_path)
        with anyio.move_on_after(self.options.connect_timeout) as scope:
            try:
                ws = await connect(
                    url,
                    headers=[("Authorization", f"Bearer {token}")],
                    ssl_context=self.options.ssl_context,
                    max_message_chars=self.options.max_incoming_chars,
                )
            except OSError as exc:
                log.info("cannot connect to %s: %s", url, exc)
                return None
            except Closed:
                return None
            try:
                welcome = await self._welcome(ws)
            except Closed as exc:
                return exc.code
        if scope.cancelled_caught:
            log.info("no session with %s within %.1f s", url, self.options.connect_timeout)
            return None
        try:
            return await self._run(ws, welcome)
        finally:
            await ws.abort()

    async def _welcome(self, ws: WebSocket) -> Welcome:
        try:
            while True:
                event = parse(await ws.receive())
                if isinstance(event, Welcome):
                    return event
                if isinstance(event, ErrorFrame):
                    self._last_error_code = event.code
                    log.warning("relayd refused the session: %s", event.code)
        except BaseException:
            await ws.abort()
            raise

    async def _run(self, ws: WebSocket, welcome: Welcome) -> int:
        self._sessions += 1
        self._last_error_code = ""
        liveness = max(welcome.heartbeat_interval, 1.0) * self.options.liveness_factor
        session = _Session(self._sessions, ws, welcome, liveness)
        self._session = session
        self._policy.connected(anyio.current_time())
        self._set_state(State.CONNECTED, f"session {session.id}")
        log.info("session %d up as %s (%s)", session.id, welcome.name, welcome.uuid)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._writer, session)
                if self.options.refresh_in_band:
                    group.start_soon(self._refresher, session)
                code = await self._reader(session)
                group.cancel_scope.cancel()
            return code
        finally:
            self._session = None
            self._acks.clear()
            self._ledger.session_ended()

    # --- the session's tasks -------------------------------------------------------------------

    async def _reader(self, session: _Session) -> int:
        while True:
            try:
                text = await session.ws.receive(idle_timeout=session.liveness)
            except Closed as exc:
                log.info("session %d closed: %s", session.id, exc)
                return exc.code
            await self._dispatch(session, parse(text))

    async def _dispatch(self, session: _Session, event: Any) -> None:
        if isinstance(event, Message):
            # A client that stopped does not take it: unacknowledged, relayd keeps it.
            with contextlib.suppress(anyio.ClosedResourceError):
                await self._inbox_send.send(_Delivery(session.id, event))
        elif isinstance(event, Receipt):
            self._on_receipt_frame(event)
        elif isinstance(event, ErrorFrame):
            self._on_error_frame(session, event)
        elif isinstance(event, TokenExpiring):
            session.expiring.set()
        elif isinstance(event, TokenRefreshed):
            session.refreshed.set()
        elif isinstance(event, Shutdown):
            log.info("relayd is shutting down: %s", event.message)
        elif isinstance(event, KeyChange):
            log.warning(
                "%s changed its %s key: %s (was %s)",
                event.client,
                event.algorithm,
                event.fingerprint,
                event.previous_fingerprint,
            )
            for listener in self._key_listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("on_key_changed callback failed")
        elif isinstance(event, AckReceived | ReadReceived | Pong | Welcome):
            pass
        elif isinstance(event, Unknown):
            log.debug("ignored a frame this client does not know")

    def _on_receipt_frame(self, receipt: Receipt) -> None:
        entry = self._ledger.receipt(receipt)
        handle = self._handles.get(receipt.msgid) if entry is not None else None
        self._settled(handle, receipt)

    def _settled(self, handle: SendHandle | None, receipt: Receipt) -> None:
        if handle is not None:
            if receipt.final:
                del self._handles[handle.msgid]
            handle._notify()
            self._room.set()
            self._room = anyio.Event()
        if self._on_receipt is not None:
            try:
                self._on_receipt(receipt, handle)
            except Exception:
                log.exception("on_receipt callback failed")

    def _on_error_frame(self, session: _Session, error: ErrorFrame) -> None:
        session.last_error = error
        self._last_error_code = error.code
        entry = self._ledger.refused(error, anyio.current_time())
        if entry is not None:
            handle = self._handles.get(entry.msgid)
            if entry.final is not None:
                self._settled(handle, entry.final)
            else:
                log.info("relayd asked to slow down; sending again in a moment")
                self._wake_writer()
            return
        if error.code in _TOKEN_ERRORS or error.code == "refresh_in_progress":
            session.refresh_error = error
            session.refreshed.set()
            return
        log.warning("relayd sent an error: %s: %s", error.code, error.message)

    async def _writer(self, session: _Session) -> None:
        try:
            while True:
                self._work = anyio.Event()
                while self._acks:
                    await self._write(session, ack_frame(self._acks.popleft()))
                while self._reads:
                    await self._write(session, read_frame(*self._reads[0]))
                    self._reads.popleft()  # written: a write cut short keeps it
                now = anyio.current_time()
                entry = self._ledger.next_to_write(now)
                if entry is not None:
                    await self._write(session, entry.frame)
                    self._ledger.written(entry)
                    continue
                wait = math.inf
                if self._ledger.has_queued():
                    wait = max(0.0, self._ledger.paused_until - now)
                with anyio.move_on_after(wait):
                    await self._work.wait()
        except (Closed, TimeoutError) as exc:
            log.info("session %d: write failed: %s", session.id, exc)
            await session.ws.abort()

    async def _flush_acks(self, session: _Session) -> None:
        """Write the pending acks (the writer may be writing one: the socket's write lock
        keeps it ahead of the close frame)."""
        with anyio.move_on_after(self.options.write_timeout):
            try:
                while self._acks:
                    await self._write(session, ack_frame(self._acks.popleft()))
            except (Closed, TimeoutError) as exc:
                log.info("session %d: acks not written before closing: %s", session.id, exc)

    async def _write(self, session: _Session, frame: dict[str, Any]) -> None:
        with anyio.fail_after(self.options.write_timeout):
            await session.ws.send(encode(frame))

    async def _refresher(self, session: _Session) -> None:
        """Renew the access token before it expires and hand it to relayd in band."""
        assert self._keeper is not None
        keeper = self._keeper
        while True:
            tokens = keeper.credentials.tokens
            assert tokens is not None
            due = refresh_due(tokens, self.options.refresh_margin)
            with anyio.move_on_after(max(0.0, due - time.time())):
                await session.expiring.wait()
                # relayd warns token_warning seconds before expiry; a token that short-lived
                # is renewed on this side's schedule (two thirds into its life) instead.
                if time.time() < (tokens.access_issued_at + tokens.access_expires_at) / 2:
                    await anyio.sleep(max(0.0, due - time.time()))
            session.expiring = anyio.Event()
            try:
                token = await keeper.renew()
            except AuthenticationError as exc:
                self._stopped(exc)
                await session.ws.close(1000, "credentials refused")
                return
            except (HttpError, ServerUnreachable) as exc:
                # relayd closes the session (4001) at expiry; the supervisor then tries again.
                log.warning("could not renew the access token: %s", exc)
                await anyio.sleep(min(5.0, max(0.5, tokens.access_expires_at - time.time())))
                continue
            session.refreshed = anyio.Event()
            session.refresh_error = None
            try:
                await self._write(session, refresh_frame(token))
            except (Closed, TimeoutError):
                return
            with anyio.move_on_after(self.options.refresh_timeout):
                await session.refreshed.wait()
            if not session.refreshed.is_set() or session.refresh_error is not None:
                why = session.refresh_error.code if session.refresh_error else "no answer"
                log.warning("relayd did not take the new token (%s): reconnecting", why)
                await session.ws.close(1000, "reconnecting with a new token")
                return


class MessageStream:
    """``async for message in client.messages()``: see :meth:`Client.messages`."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._previous: Message | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if self._previous is not None:
            self._client.ack(self._previous)
            self._previous = None
        try:
            delivery = await self._client._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            error = self._client.error
            if error is not None and not self._client._closing:
                raise error from None
            raise StopAsyncIteration from None
        self._previous = delivery.message
        return delivery.message
