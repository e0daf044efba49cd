"""The Redis engine's store: :class:`RedisStore`, the SQLite store's contract on Redis."""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

from relayd._atrest import StoreKeys
from relayd._engine import (
    CreateTopicOutcome,
    HistoryEntry,
    HistoryQuery,
    PublishPolicy,
    SubscribeOutcome,
    TopicAccess,
    TopicCounts,
    TopicMessage,
    TopicRecord,
    UnsubscribeOutcome,
)
from relayd._errors import SchemaTooNewError, StoreError
from relayd._relay.records import Publish, Purge, RecentMessage, StoredMessage, StoreOp
from relayd._store import (
    ClientRecord,
    FamilyRecord,
    InviteRecord,
    KeyRecord,
    MessageRecord,
    Publication,
    RotateOutcome,
)

from . import _codec as C
from ._link import Link
from ._url import connect, parse_url

log = logging.getLogger("relayd.store")

LAYOUT_VERSION = 3
"""The version of the key layout (see the package's docstring); kept under ``<prefix>schema``.
1: a message and its one recipient's copy in one hash; 2: a message and its deliveries; 3:
topics (keys and message fields of their own: layout 2 data needs no change)."""
DEFAULT_PREFIX = "relayd:"
DEFAULT_TIMEOUT = 5.0
"""Seconds each call to Redis may take (connecting included) before it fails."""
DEFAULT_WAIT_TIMEOUT = 1.0
"""Seconds a write may wait for its replicas (``WAIT``) on top of its own deadline."""
SEAL_PAGE = 256
"""Rows sealed per round trip when opening seals rows stored in plain text."""
MIGRATION_PAGE = 500
"""Messages migrated to a new layout per round trip: each call holds Redis (which runs
nothing else meanwhile) for about a millisecond."""
FORGET_PAGE = 500
"""Deliveries of a deleted client's history looked at per round trip (a history of 100,000
held Redis for ~10 s in one call: ~0.1 ms each, so a page holds it for ~50 ms)."""


class RedisStore:
    """relayd's durable state on a Redis (or Valkey) server; the same contract as
    :class:`relayd._store.Store` (its docstrings say what each method does). Open it with
    :meth:`RedisStore.open`.

    Every method is one round trip (``EVALSHA``) and atomic on the server (but for a batch that
    holds a ``Publish``, two; and the pages of a deletion or a purge). Every call has a
    deadline (``call_timeout``). A method that raises :class:`~relayd._errors.StoreUnavailable`
    after its request was sent may or may not have taken effect, as a whole.
    """

    def __init__(self, link: Link, *, keys: StoreKeys | None, prefix: str) -> None:
        self._link = link
        self.keys = keys
        """Encrypt message content with these (``None``: plain text, for tests and tools
        that never read a message's fields)."""
        self.prefix = prefix
        self.where = link.where
        """The server, as errors name it (never with its password)."""
        self.durability = "unknown"
        """What the server's persistence settings promise (see :meth:`open`)."""
        # The message id reserved for each Publish of a batch (see execute), kept while the
        # Publish lives: a batch run again (its answer was lost) stores it under the same id,
        # so the script finds it ("this very Publish") rather than a duplicate.
        self._publish_ids: weakref.WeakKeyDictionary[Publish, int] = weakref.WeakKeyDictionary()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        keys: StoreKeys | None = None,
        prefix: str = DEFAULT_PREFIX,
        call_timeout: float = DEFAULT_TIMEOUT,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        migration_page: int = MIGRATION_PAGE,
    ) -> AsyncIterator[RedisStore]:
        """Connect to ``url`` (see :mod:`relayd._redis._url` for its forms), load the script,
        check the layout version, and close the connections on exit. With ``keys``, message
        content is encrypted: the keys are checked against the stored messages (every key one
        needs is there, and decrypts it) and messages stored in plain text are sealed.

        ``call_timeout``: seconds each call may take (connecting included).
        ``wait_replicas``: after each write, wait until that many replicas have it (``WAIT``),
        at most ``wait_timeout`` seconds more, else the write fails with
        :class:`~relayd._errors.StoreUnavailable` (it stays on the primary).

        Data of an older layout is migrated first, ``migration_page`` messages per round
        trip (see :meth:`migrate`).

        The server's persistence (``appendonly``, ``appendfsync``) is read, logged and kept
        in :attr:`durability`; it is not enforced.

        Raises:
            RedisUrlError: ``url`` is not one of the forms relayd understands.
            StoreUnavailable: the server cannot be reached or did not answer in time.
            SchemaTooNewError: the data under ``prefix`` was laid out by a newer relayd.
            UndecryptableRow: ``keys`` lack a key that messages need, or hold a wrong one.
        """
        endpoint = parse_url(url)
        async with connect(endpoint, connect_timeout=call_timeout) as client:
            link = Link(
                client,
                where=endpoint.where,
                prefix=prefix,
                timeout=call_timeout,
                wait_replicas=wait_replicas,
                wait_timeout=wait_timeout,
            )
            await link.load()
            store = cls(link, keys=keys, prefix=prefix)
            await store._check_layout(migration_page)
            await store._finish_forgetting()
            store.durability = await store._read_durability()
            if keys is not None:
                await store._check_keys(keys)
            try:
                yield store
            finally:
                link.closed = True

    async def _call(self, operation: str, *args: Any, write: bool = True) -> Any:
        return await self._link.call(operation, list(args), write=write)

    async def _check_layout(self, migration_page: int) -> None:
        # No WAIT: the version, written once, is worth no refusal to open.
        version, migrating = await self._call("layout", LAYOUT_VERSION, write=False)
        if version > LAYOUT_VERSION:
            raise SchemaTooNewError(
                f"{self.where}: the data under {self.prefix!r} has layout version {version},"
                f" newer than this relayd understands ({LAYOUT_VERSION}); run a newer relayd"
            )
        if version < LAYOUT_VERSION or migrating:
            await self.migrate(migration_page)

    async def migrate(self, page: int = MIGRATION_PAGE) -> None:
        """Bring the data under the prefix to :data:`LAYOUT_VERSION`, ``page`` messages per
        round trip (one ``EVALSHA`` each, so that Redis is never held long), logging progress.

        The first round trip writes the new version (a relayd that knows only the old layout
        refuses the data from then on) and a cursor; each moves the cursor, atomically; the
        last deletes it. Cancelled, or on an error, the migration stops between two round
        trips; the next :meth:`open` (here or on another node) goes on from the cursor. Nodes
        migrating at once share the cursor. A relayd that knows only the old layout and is
        *running* (opened before) must be stopped first: it would go on writing the old one.
        """
        if page < 1:
            raise ValueError(f"migrate at least one message per round trip, not {page}")
        log.info(
            "%s: migrating the data under %r to layout %d", self.where, self.prefix, LAYOUT_VERSION
        )
        while left := int(await self._call("migrate", LAYOUT_VERSION, page)):
            log.info("%s: layout migration: %d messages to go", self.where, left)
        log.info("%s: the data under %r is in layout %d", self.where, self.prefix, LAYOUT_VERSION)

    async def _read_durability(self) -> str:
        """``appendonly``/``appendfsync`` as the server reports them: with ``appendonly yes``
        and ``appendfsync always``, Redis answers a write only once it is in the AOF and
        fsynced; ``everysec`` may lose the last second of writes in a crash of the server's
        machine; without the AOF, whatever the RDB snapshots missed."""
        try:
            config = await self._link.command(
                "CONFIG GET", lambda client: client.config_get(["appendonly", "appendfsync"])
            )
        except StoreError as exc:  # managed services often refuse CONFIG
            log.warning("cannot read the Redis server's persistence settings: %s", exc)
            return "unknown"
        values = {C.text(k): C.text(v) for k, v in config.items()}
        durability = (
            f"aof-{values.get('appendfsync', '?')}" if values.get("appendonly") == "yes" else "rdb"
        )
        level = logging.INFO if durability == "aof-always" else logging.WARNING
        log.log(
            level,
            "Redis persistence: %s%s",
            durability,
            "" if durability == "aof-always" else " (a crash may lose acknowledged writes)",
        )
        return durability

    async def _check_keys(self, keys: StoreKeys) -> int:
        """Every key the stored messages need is in ``keys`` and decrypts one of them; then
        messages still in plain text (stored without keys) are sealed. Returns how many.

        Raises:
            UndecryptableRow: naming the key that is missing or wrong.
        """
        for row in await self._call("first_sealed", write=False):
            C.open_content(row, keys)
        sealed = 0
        while rows := await self._call("plain_rows", SEAL_PAGE, write=False):
            entries = []
            for row in rows:
                key_id, blob = keys.seal(C.content_id(row), C.text(row[4]))
                entries.append([int(row[0]), key_id, C.raw(blob)])
            sealed += int(await self._link.call("seal", entries, write=True))
        return sealed

    async def schema_version(self) -> int:
        """The version of the key layout (see the package's docstring)."""
        return int(await self._call("schema_version", write=False))

    # --- clients ----------------------------------------------------------------------------

    async def insert_client(
        self, client: ClientRecord, *, invite: str | None = None
    ) -> Literal["inserted", "uuid_taken", "invite_invalid"]:
        outcome = await self._call(
            "insert_client",
            client.uuid,
            client.name,
            client.secret_hash,
            " ".join(client.roles),
            C.when(client.created_at),
            C.when(client.tokens_valid_after),
            False if invite is None else invite,
        )
        return cast(Literal["inserted", "uuid_taken", "invite_invalid"], C.text(outcome))

    async def rename_client(self, uuid: str, name: str) -> None:
        await self._call("rename_client", uuid, name)

    async def set_roles(self, uuid: str, roles: tuple[str, ...]) -> bool:
        return bool(await self._call("set_roles", uuid, " ".join(roles)))

    async def set_secret(
        self,
        uuid: str,
        secret_hash: str,
        *,
        revoke_at: float | None,
        replacing: str | None = None,
        token_issued_at: float | None = None,
    ) -> bool:
        return bool(
            await self._call(
                "set_secret",
                uuid,
                secret_hash,
                C.maybe_when(revoke_at),
                False if replacing is None else replacing,
                C.maybe_when(token_issued_at),
            )
        )

    async def set_read_receipts(self, uuid: str, enabled: bool) -> bool:
        return bool(await self._call("set_read_receipts", uuid, int(enabled)))

    async def set_last_seen(self, seen: Mapping[str, float]) -> None:
        flat: list[str] = []
        for uuid, at in seen.items():
            flat += [uuid, C.when(at)]
        if flat:
            await self._call("set_last_seen", *flat)

    async def get_client(self, uuid: str) -> ClientRecord | None:
        return C.client_record(await self._call("get_client", uuid, write=False))

    async def token_holder(self, uuid: str, family: str | None) -> tuple[ClientRecord | None, bool]:
        row, live = await self._call(
            "token_holder", uuid, False if family is None else family, write=False
        )
        return C.client_record(row), bool(live)

    async def list_clients(self) -> list[ClientRecord]:
        rows = await self._call("list_clients", write=False)
        return [record for row in rows if (record := C.client_record(row)) is not None]

    async def revoke_client_tokens(self, uuid: str, at: float) -> bool:
        return bool(await self._call("revoke_client_tokens", uuid, C.when(at)))

    async def delete_client(self, uuid: str, at: float) -> bool:
        """The tombstone, families and keys go in one call; the client's history then a page
        per call (:meth:`_forget_history`), so that a big one never holds Redis for long. If
        this is cancelled or fails between pages, the next open of the store finishes it."""
        deleted, more = await self._call("delete_client", uuid, C.when(at), FORGET_PAGE)
        if more:
            await self._forget_history(uuid)
        return bool(deleted)

    async def _forget_history(self, uuid: str) -> None:
        while await self._call("forget_history", uuid, FORGET_PAGE):
            pass

    async def _finish_forgetting(self) -> None:
        """What a deletion left unfinished (a node stopped between its pages) is forgotten."""
        for uuid in await self._call("forgetting", write=False):
            await self._forget_history(C.text(uuid))

    # --- refresh families -------------------------------------------------------------------

    async def create_family(
        self,
        family: str,
        client_uuid: str,
        jti: str,
        at: float,
        expires_at: float,
        *,
        secret_hash: str | None = None,
        token_issued_at: float | None = None,
    ) -> bool:
        """As :meth:`Store.create_family`; a client that was never registered, or a family
        that exists, is a :class:`~relayd._errors.StoreError` (SQLite: ``IntegrityError``)."""
        return bool(
            await self._call(
                "create_family",
                family,
                client_uuid,
                jti,
                C.when(at),
                C.when(expires_at),
                False if secret_hash is None else secret_hash,
                C.maybe_when(token_issued_at),
            )
        )

    async def rotate_family(
        self, family: str, presented_jti: str, new_jti: str, at: float, expires_at: float
    ) -> RotateOutcome:
        """Rotate ``family`` from ``presented_jti`` to ``new_jti``, atomically: the check of
        the current jti and the rotation (or the revocation, on reuse) are one script."""
        outcome = await self._call(
            "rotate_family", family, presented_jti, new_jti, C.when(at), C.when(expires_at)
        )
        return cast(RotateOutcome, C.text(outcome))

    async def revoke_family(self, family: str, at: float, reason: str) -> bool:
        return bool(await self._call("revoke_family", family, C.when(at), reason))

    async def get_family(self, family: str) -> FamilyRecord | None:
        row = await self._call("get_family", family, write=False)
        if row is None:
            return None
        client, jti, expires_at, revoked_at = row
        return FamilyRecord(
            family, C.text(client), C.text(jti), float(expires_at), C.maybe_float(revoked_at)
        )

    # --- revoked access tokens --------------------------------------------------------------

    async def revoke_token(self, jti: str, subject: str, at: float, expires_at: float) -> None:
        await self._call("revoke_token", jti, subject, C.when(at), C.when(expires_at))

    async def revoked_token_ids(self, now: float) -> set[str]:
        """The jtis of revoked tokens that have not expired yet; purges the expired ones."""
        return {C.text(jti) for jti in await self._call("revoked_token_ids", C.when(now))}

    async def purge_expired_families(self, now: float) -> int:
        return int(await self._call("purge_expired_families", C.when(now)))

    # --- invites ----------------------------------------------------------------------------

    async def create_invite(
        self, invite: str, *, by: str, at: float, expires_at: float, max_open: int
    ) -> bool:
        return bool(
            await self._call("create_invite", invite, by, C.when(at), C.when(expires_at), max_open)
        )

    async def list_invites(self) -> list[InviteRecord]:
        """Every invite kept, newest first."""
        records = [C.invite_record(row) for row in await self._call("list_invites", write=False)]
        return sorted(records, key=lambda r: (-r.created_at, r.id.encode()))

    async def purge_invites(self, now: float, keep_spent: float) -> int:
        return int(await self._call("purge_invites", C.when(now), C.when(now - keep_spent)))

    # --- the key directory ------------------------------------------------------------------

    async def publish_keys(
        self,
        client_uuid: str,
        keys: Sequence[KeyRecord],
        at: float,
        *,
        max_superseded: int,
        max_notices: int,
    ) -> Publication | None:
        reply = await self._call(
            "publish_keys",
            client_uuid,
            [[key.algorithm, C.raw(key.key), key.fingerprint] for key in keys],
            C.when(at),
            max_superseded,
            max_notices,
        )
        if reply is None:
            return None
        changed, notices = reply
        return Publication(
            tuple(C.text(a) for a in changed), tuple(C.key_notice(n) for n in notices)
        )

    async def read_keys(
        self, client_uuid: str, reader: str | None, at: float, *, max_readers: int
    ) -> list[KeyRecord] | None:
        rows = await self._call(
            "read_keys", client_uuid, False if reader is None else reader, C.when(at), max_readers
        )
        return None if rows is None else C.key_records(rows)

    # --- the message queue ------------------------------------------------------------------

    async def execute(
        self, ops: Sequence[StoreOp], *, max_queued: int, inline: bool = False
    ) -> list[Any]:
        """Run ``ops`` in order, atomically, in one round trip (one script: a group commit);
        return their results, as :meth:`Store.execute` does. ``inline`` changes nothing here
        (there is no worker thread to spare).

        The script checks the whole batch before its first write; a batch it refuses (an
        ``Insert`` whose seq holds another message) writes nothing. Unlike SQLite, rows a read
        loads are decrypted after the batch is committed: an undecryptable row raises, but the
        batch's writes stay.

        Raises:
            StoreUnavailable: Redis did not answer in time or cannot be reached; the batch was
                applied as a whole, or not at all.
            StoreError: the batch was refused; nothing was written.
            UndecryptableRow: a loaded row cannot be decrypted.
        """
        if not ops:
            return []
        await self._reserve_publish_ids(ops)
        encoded = [
            C.encode_publish(op, self._publish_ids[op], self.keys)
            if isinstance(op, Publish)
            else C.encode(op, self.keys)
            for op in ops
        ]
        write = any(isinstance(op, C.WRITES) for op in ops)
        replies = await self._link.call("execute", [max_queued, *encoded], write=write)
        results = [C.decode(op, reply, self.keys) for op, reply in zip(ops, replies, strict=True)]
        for op, reply in zip(ops, replies, strict=True):
            if isinstance(op, Purge):
                await self._purge_more(op, reply)
        return results

    async def _reserve_publish_ids(self, ops: Sequence[StoreOp]) -> None:
        """An id for each Publish of ``ops`` that has none yet, from the seq counter (one
        round trip for them all, before the batch's).

        A published message's content is sealed for its id (as SQLite seals it), and Redis
        only ever holds it sealed, so Python must know the id before the script runs; the
        script cannot seal (it holds no key). The id is reserved here, as the core reserves
        an Insert's seq; the deliveries' seqs, whose number only the script knows (the
        subscribers then), are taken by the script from the same counter. A reserved id that
        a refused Publish leaves unused is a gap, as a reserved seq the core never used."""
        needed = [op for op in ops if isinstance(op, Publish) and op not in self._publish_ids]
        if not needed:
            return
        first = await self.reserve_seqs(len(needed))
        for offset, op in enumerate(needed):
            self._publish_ids[op] = first + offset

    async def _purge_more(self, op: Purge, reply: list[int]) -> None:
        """The rest of a purge the batch began: a page (``PURGE_PAGE``) per call, so that a
        big one (a busy relay's sweep, or the first after a long pause) never holds Redis for
        long; then the topic messages that aged out of their history, a page per call too.
        Cancelled, or on an error, the rest waits for the next sweep."""
        more, skip, aged = reply
        before = (C.when(op.finished_before), C.when(op.receipts_before))
        while more:
            more, skip, _ = await self._call("purge", *before, C.PURGE_PAGE, skip)
        while aged and op.now is not None:
            aged = await self._call("trim_aged", C.when(op.now), C.PURGE_PAGE)

    async def reserve_seqs(self, count: int) -> int:
        """Reserve ``count`` message seqs; return the first. The seqs come from one counter
        on the server, so that no two nodes (nor two calls) are ever given the same one; it
        also keeps the highest seq ever stored (:meth:`last_message_seq`)."""
        if count < 1:
            raise ValueError(f"reserve at least one seq, not {count}")
        last = int(await self._call("reserve_seqs", count))
        return last - count + 1

    async def last_message_seq(self) -> int:
        """The highest seq ever reserved or stored (0 if none)."""
        return int(await self._call("last_message_seq", write=False))

    async def recent_messages(self, since: float, limit: int) -> list[RecentMessage]:
        rows = await self._call("recent_messages", C.when(since), limit, write=False)
        return [C.recent_message(row) for row in rows]

    async def message_record(self, msgid: str, client: str) -> MessageRecord | None:
        row = await self._call("message_record", msgid, client, write=False)
        return None if row is None else C.message_record(row)

    async def msgid_known(self, msgid: str) -> bool:
        return bool(await self._call("msgid_known", msgid, write=False))

    async def undelivered(self, recipient: str, limit: int) -> tuple[int, list[StoredMessage]]:
        count, rows = await self._call("undelivered", recipient, limit, write=False)
        return int(count), [C.stored_message(row, self.keys) for row in rows]

    async def history(self, query: HistoryQuery) -> list[HistoryEntry]:
        """A page of ``query.client``'s history (see :class:`HistoryQuery`), content
        decrypted; read on the history indexes, so that it costs the page, not the history.

        Raises:
            UndecryptableRow: a message's content cannot be decrypted with the store's keys.
        """
        rows = await self._call(
            "history",
            query.client,
            query.box,
            False if query.peer is None else query.peer,
            False if query.conversation_id is None else query.conversation_id,
            int(query.newest_first),
            False if query.cursor is None else query.cursor,
            query.limit,
            write=False,
        )
        return [C.history_entry(row, self.keys) for row in rows]

    async def keys_in_use(self) -> dict[str | None, int]:
        rows = await self._call("keys_in_use", write=False)
        return {C.maybe_text(key_id): int(count) for key_id, count in rows}

    async def queued_total(self) -> int:
        return sum((await self.queue_depths()).values())

    async def queue_depths(self) -> dict[str, int]:
        rows = await self._call("queue_depths", write=False)
        return {C.text(recipient): int(count) for recipient, count in rows}

    # --- topics -----------------------------------------------------------------------------

    async def create_topic(self, topic: TopicRecord, *, max_owned: int) -> CreateTopicOutcome:
        outcome = await self._call(
            "create_topic",
            topic.id,
            topic.creator,
            topic.metadata,
            topic.access,
            topic.publish,
            int(topic.presence),
            topic.history_count,
            C.when(topic.history_age),
            C.when(topic.created_at),
            max_owned,
        )
        return cast(CreateTopicOutcome, C.text(outcome))

    async def get_topic(self, topic_id: str) -> TopicRecord | None:
        return C.topic_record(await self._call("get_topic", topic_id, write=False))

    async def list_topics(
        self, viewer: str | None, *, everything: bool, after: str | None, limit: int
    ) -> list[TopicRecord]:
        """As :meth:`Store.list_topics`: a page costs its size (and, for a viewer, a walk of
        its subscriptions up to where the page ends)."""
        rows = await self._call(
            "list_topics",
            False if viewer is None else viewer,
            int(everything),
            False if after is None else after,
            limit,
            write=False,
        )
        return [record for row in rows if (record := C.topic_record(row)) is not None]

    async def update_topic(
        self,
        topic_id: str,
        *,
        metadata: str | None = None,
        access: TopicAccess | None = None,
        publish: PublishPolicy | None = None,
        presence: bool | None = None,
        history_count: int | None = None,
        history_age: float | None = None,
    ) -> TopicRecord | None:
        return C.topic_record(
            await self._call(
                "update_topic",
                topic_id,
                False if metadata is None else metadata,
                False if access is None else access,
                False if publish is None else publish,
                False if presence is None else int(presence),
                False if history_count is None else history_count,
                C.maybe_when(history_age),
            )
        )

    async def delete_topic(self, topic_id: str) -> bool:
        """As :meth:`Store.delete_topic`, in one call: it holds Redis for each member and
        message of the topic's history (about 1 µs each; a topic's members are bounded by
        the server's limit)."""
        return bool(await self._call("delete_topic", topic_id))

    async def subscribe(
        self,
        topic_id: str,
        client: str,
        at: float,
        *,
        max_subscribers: int,
        max_subscriptions: int,
        invited: bool = False,
    ) -> SubscribeOutcome:
        """As :meth:`Store.subscribe`; when the client joined (``at``) is not kept (nothing
        reads it)."""
        outcome = await self._call(
            "subscribe", topic_id, client, max_subscribers, max_subscriptions, int(invited)
        )
        return cast(SubscribeOutcome, C.text(outcome))

    async def unsubscribe(self, topic_id: str, client: str) -> UnsubscribeOutcome:
        return cast(UnsubscribeOutcome, C.text(await self._call("unsubscribe", topic_id, client)))

    async def is_subscribed(self, topic_id: str, client: str) -> bool:
        return bool(await self._call("is_subscribed", topic_id, client, write=False))

    async def topic_subscribers(self, topic_id: str, *, after: str | None, limit: int) -> list[str]:
        rows = await self._call(
            "topic_subscribers", topic_id, False if after is None else after, limit, write=False
        )
        return [C.text(uuid) for uuid in rows]

    async def client_topics(self, client: str) -> list[str]:
        return [C.text(topic) for topic in await self._call("client_topics", client, write=False)]

    async def memberships(self, client: str) -> list[tuple[str, bool]]:
        rows = await self._call("memberships", client, write=False)
        return [(C.text(topic), bool(presence)) for topic, presence in rows]

    async def topic_messages(
        self, topic_id: str, *, since: int, limit: int, now: float
    ) -> list[TopicMessage]:
        """As :meth:`Store.topic_messages`, content decrypted.

        Raises:
            UndecryptableRow: a message's content cannot be decrypted with the store's keys.
        """
        rows = await self._call("topic_messages", topic_id, since, limit, C.when(now), write=False)
        return [C.topic_message(row, self.keys) for row in rows]

    async def topic_counts(self, message_ids: Sequence[int]) -> dict[int, TopicCounts]:
        """As :meth:`Store.topic_counts`: counters each message keeps, a few reads each,
        whatever its number of deliveries."""
        rows = await self._call("topic_counts", list(message_ids), write=False)
        return dict(C.topic_counts(row) for row in rows)
