"""What relayd asks of a storage engine, whichever it is.

relayd keeps its durable state in an *engine*: the embedded SQLite store
(``relayd/_store.py``, the default) or a Redis/Valkey server shared by many nodes
(``relayd/_redis/``). Both implement the two protocols here with the same semantics, and the
rest of relayd sees only these:

* :class:`ClientStore`: clients, their logins (refresh families), revoked tokens, invites and
  the public-key directory;
* :class:`MessageStore`: the message queue. The relay core never calls it: it emits store
  operations as data (``relayd/_relay/records.py``) that the hub runs in batches with
  :meth:`MessageStore.execute`, one atomic batch per round trip (SQLite's group commit, one Lua
  script on Redis). Message seqs come from :meth:`MessageStore.reserve_seqs`, and
  deduplication's truth is the store's ``(sender, msgid)`` uniqueness, so that many nodes can
  share one engine.

The records both engines return are defined here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

from attrs import frozen

from ._atrest import StoreKeys
from ._relay.records import KeyNotice, RecentMessage, StoredMessage, StoreOp

if TYPE_CHECKING:
    from ._cluster import RedisCluster
    from ._config import Config

# Runs a blocking call off the event loop: (fn, *args) -> its result (see relayd/_store.py).
Executor = Callable[..., Awaitable[Any]]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@frozen
class ClientRecord:
    uuid: str
    name: str
    secret_hash: str
    roles: tuple[str, ...]
    created_at: float
    tokens_valid_after: float
    deleted_at: float | None = None
    read_receipts: bool = True  # its reads are told to their senders (see MarkRead)
    last_seen: float | None = None  # when it last had a live socket (connected or closed)


@frozen
class FamilyRecord:
    family: str
    client_uuid: str
    current_jti: str
    expires_at: float
    revoked_at: float | None


@frozen
class InviteRecord:
    id: str  # hex SHA-256 of the code
    created_at: float
    created_by: str
    expires_at: float
    used_at: float | None
    used_by: str | None

    def to_json(self) -> dict[str, Any]:
        """As the admin API lists it: the id shortened to 12 hex digits (enough to tell
        invites apart; the code cannot be recovered from it)."""
        return {
            "id": self.id[:12],
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "used_at": self.used_at,
            "used_by": self.used_by,
        }


@frozen
class MessageRecord:
    """What the store keeps of a message for its status (``status`` None: not final yet)."""

    seq: int
    sender: str
    recipient: str
    msgid: str
    status: str | None
    reason: str
    attempts: int
    accepted_at: float
    expires_at: float
    finished_at: float | None
    delivered_at: float | None = None
    read_at: float | None = None  # None too for its sender when the reader hid it
    message: int = 0  # the message's id (a topic message's counts are read by it)
    topic: str | None = None  # published to this topic (its status is its counts)


@frozen
class HistoryQuery:
    """A page of what ``client`` sent and received (``box``: ``"all"``, ``"inbox"`` or
    ``"sent"``), optionally only with ``peer`` or in ``conversation_id``; in seq order
    (``newest_first`` or oldest first), continuing past the seq ``cursor`` (``None``: from the
    start), at most ``limit`` entries."""

    client: str
    box: Literal["all", "inbox", "sent"] = "all"
    peer: str | None = None
    conversation_id: str | None = None
    newest_first: bool = True
    cursor: int | None = None
    limit: int = 50


@frozen
class HistoryEntry:
    """One delivery of a message, as history shows it: ``fields`` is ``""`` once its content
    was erased (``history.retention`` passed, or 0), ``status`` ``None`` while it waits."""

    seq: int
    msgid: str
    sender: str
    recipient: str
    fields: str
    conversation_id: str | None
    status: str | None
    reason: str
    attempts: int
    accepted_at: float
    delivered_at: float | None
    read_at: float | None
    finished_at: float | None


RotateOutcome = Literal["rotated", "reused", "revoked", "unknown"]


@frozen
class KeyRecord:
    """A public key in the directory: current while ``superseded_at`` is ``None``."""

    algorithm: str
    key: bytes
    fingerprint: str
    published_at: float
    superseded_at: float | None = None


@frozen
class Publication:
    """What publishing keys changed: the algorithms whose current key is new, and the key
    changes owed to the client's readers (one per reader and changed algorithm)."""

    changed: tuple[str, ...]
    notices: tuple[KeyNotice, ...]


InsertClientOutcome = Literal["inserted", "uuid_taken", "invite_invalid"]

TopicAccess = Literal["open", "private"]
PublishPolicy = Literal["members", "owner"]


@frozen
class TopicRecord:
    """A topic (a room): ``access`` ``"open"`` (anyone may subscribe) or ``"private"`` (its
    owner or an admin adds members); ``publish`` ``"members"`` (any subscriber, and the
    owner) or ``"owner"`` (the owner and admins: an announcement channel). Its history keeps
    its last ``history_count`` messages, none older than ``history_age`` seconds; each
    message has the next ``offset`` (``last_offset`` is the newest given). ``metadata`` is a
    JSON object's text, as its creator gave it."""

    id: str
    creator: str
    metadata: str = "{}"
    access: TopicAccess = "open"
    publish: PublishPolicy = "members"
    presence: bool = False
    history_count: int = 100
    history_age: float = 86400.0
    created_at: float = 0.0
    subscribers: int = 0
    last_offset: int = 0


@frozen
class TopicMessage:
    """A message in a topic's history."""

    offset: int
    msgid: str
    sender: str
    fields: str  # the published fields, JSON
    accepted_at: float


@frozen
class TopicCounts:
    """What became of a published message's deliveries, one per subscriber it went to."""

    total: int
    delivered: int = 0
    acknowledged: int = 0
    failed: int = 0
    expired: int = 0

    @property
    def pending(self) -> int:
        return self.total - self.delivered - self.acknowledged - self.failed - self.expired


CreateTopicOutcome = Literal["created", "exists", "too_many"]
SubscribeOutcome = Literal[
    "subscribed",
    "already",
    "topic_not_found",
    "private",
    "topic_full",
    "too_many",
    "unknown_client",
]
UnsubscribeOutcome = Literal["unsubscribed", "not_subscribed", "topic_not_found"]


class ClientStore(Protocol):
    """Clients, logins, revocations, invites and public keys. The contract of each method is
    the SQLite store's docstring (``relayd/_store.py``); ``tests/test_store.py`` runs it on
    both engines."""

    async def insert_client(
        self, client: ClientRecord, *, invite: str | None = None
    ) -> InsertClientOutcome: ...
    async def rename_client(self, uuid: str, name: str) -> None: ...
    async def set_roles(self, uuid: str, roles: tuple[str, ...]) -> bool: ...
    async def set_secret(
        self,
        uuid: str,
        secret_hash: str,
        *,
        revoke_at: float | None,
        replacing: str | None = None,
        token_issued_at: float | None = None,
    ) -> bool: ...
    async def get_client(self, uuid: str) -> ClientRecord | None: ...
    async def set_read_receipts(self, uuid: str, enabled: bool) -> bool: ...
    async def set_last_seen(self, seen: Mapping[str, float]) -> None: ...
    async def token_holder(
        self, uuid: str, family: str | None
    ) -> tuple[ClientRecord | None, bool]: ...
    async def list_clients(self) -> list[ClientRecord]: ...
    async def revoke_client_tokens(self, uuid: str, at: float) -> bool: ...
    async def delete_client(self, uuid: str, at: float) -> bool: ...
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
    ) -> bool: ...
    async def rotate_family(
        self, family: str, presented_jti: str, new_jti: str, at: float, expires_at: float
    ) -> RotateOutcome: ...
    async def revoke_family(self, family: str, at: float, reason: str) -> bool: ...
    async def get_family(self, family: str) -> FamilyRecord | None: ...
    async def revoke_token(self, jti: str, subject: str, at: float, expires_at: float) -> None: ...
    async def revoked_token_ids(self, now: float) -> set[str]: ...
    async def purge_expired_families(self, now: float) -> int: ...
    async def create_invite(
        self, invite: str, *, by: str, at: float, expires_at: float, max_open: int
    ) -> bool: ...
    async def list_invites(self) -> list[InviteRecord]: ...
    async def purge_invites(self, now: float, keep_spent: float) -> int: ...
    async def publish_keys(
        self,
        client_uuid: str,
        keys: Sequence[KeyRecord],
        at: float,
        *,
        max_superseded: int,
        max_notices: int,
    ) -> Publication | None: ...
    async def read_keys(
        self, client_uuid: str, reader: str | None, at: float, *, max_readers: int
    ) -> list[KeyRecord] | None: ...


class TopicStore(Protocol):
    """Topics, their subscribers and their history (publishing is the store operation
    :class:`~relayd._relay.records.Publish`). The contract is the SQLite store's docstrings
    (``relayd/_store_topics.py``); ``tests/test_store_topics.py`` runs it on both engines."""

    async def create_topic(self, topic: TopicRecord, *, max_owned: int) -> CreateTopicOutcome: ...
    async def get_topic(self, topic_id: str) -> TopicRecord | None: ...
    async def list_topics(
        self, viewer: str | None, *, everything: bool, after: str | None, limit: int
    ) -> list[TopicRecord]: ...
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
    ) -> TopicRecord | None: ...
    async def delete_topic(self, topic_id: str) -> bool: ...
    async def subscribe(
        self,
        topic_id: str,
        client: str,
        at: float,
        *,
        max_subscribers: int,
        max_subscriptions: int,
        invited: bool = False,
    ) -> SubscribeOutcome: ...
    async def unsubscribe(self, topic_id: str, client: str) -> UnsubscribeOutcome: ...
    async def is_subscribed(self, topic_id: str, client: str) -> bool: ...
    async def topic_subscribers(
        self, topic_id: str, *, after: str | None, limit: int
    ) -> list[str]: ...
    async def client_topics(self, client: str) -> list[str]: ...
    async def memberships(self, client: str) -> list[tuple[str, bool]]: ...
    async def topic_messages(
        self, topic_id: str, *, since: int, limit: int, now: float
    ) -> list[TopicMessage]: ...
    async def topic_counts(self, message_ids: Sequence[int]) -> dict[int, TopicCounts]: ...


class MessageStore(Protocol):
    """The message queue: the store operations of ``relayd/_relay/records.py``, and what the
    REST routes and metrics read of it."""

    keys: StoreKeys | None
    """Encrypt message content with these (``None``: plain text)."""

    async def execute(
        self, ops: Sequence[StoreOp], *, max_queued: int, inline: bool = False
    ) -> list[Any]: ...
    async def reserve_seqs(self, count: int) -> int: ...
    async def last_message_seq(self) -> int: ...
    async def recent_messages(self, since: float, limit: int) -> list[RecentMessage]: ...
    async def message_record(self, msgid: str, client: str) -> MessageRecord | None: ...
    async def msgid_known(self, msgid: str) -> bool: ...
    async def undelivered(self, recipient: str, limit: int) -> tuple[int, list[StoredMessage]]: ...
    async def keys_in_use(self) -> dict[str | None, int]: ...
    async def queued_total(self) -> int: ...
    async def queue_depths(self) -> dict[str, int]: ...
    async def history(self, query: HistoryQuery) -> list[HistoryEntry]: ...


class Engine(ClientStore, MessageStore, TopicStore, Protocol):
    """A whole engine: what the daemon opens (``store.engine``)."""

    async def schema_version(self) -> int: ...


@asynccontextmanager
async def open_engine(
    config: Config,
    *,
    keys: StoreKeys | None = None,
    executor: Executor | None = None,
) -> AsyncIterator[Engine]:
    """Open the engine ``config.store`` names, for as long as the context lasts.

    ``executor``: runs SQLite's calls (tests pass one that keeps virtual time still).

    Raises:
        StoreError: the engine cannot be opened (a file that is not SQLite, Redis unreachable
            or refusing, a schema or key layout from a newer relayd...).
        UndecryptableRow: ``keys`` lack a key the stored messages need, or hold a wrong one.
    """
    store = config.store
    if store.engine == "redis":
        from ._redis import RedisStore

        async with RedisStore.open(
            store.url or DEFAULT_REDIS_URL,
            keys=keys,
            prefix=store.prefix,
            call_timeout=store.timeout,
            wait_replicas=store.wait_replicas,
            wait_timeout=store.wait_timeout,
        ) as redis:
            yield redis
        return
    from ._store import Store, thread_executor

    async with Store.open(
        config.store_path,
        synchronous=store.synchronous,
        executor=executor or thread_executor,
        keys=keys,
    ) as sqlite:
        yield sqlite


@asynccontextmanager
async def open_cluster(config: Config) -> AsyncIterator[RedisCluster | None]:
    """The cluster this node joins (``None``: the SQLite engine, one node). coredis is
    imported only here and in :func:`open_engine`, for the Redis engine."""
    store = config.store
    if store.engine != "redis":
        yield None
        return
    from ._cluster import SEQ_KEY, RedisCluster

    async with RedisCluster.open(
        store.url or DEFAULT_REDIS_URL,
        prefix=store.prefix,
        lease=store.lease,
        call_timeout=store.timeout,
        seq_key=store.prefix + SEQ_KEY,
    ) as cluster:
        yield cluster
