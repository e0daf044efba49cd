"""The topics' REST routes (issue 13): the seed system's (``POST /topics/create``,
``GET /topics``, ``POST /topics/subscribe`` and ``/unsubscribe``, ``GET /topics/{id}``), which
take the token as ``?token=`` as well as in the Authorization header, and relayd's own: a
topic's settings, deletion, members, and history.

Who may do what (``docs/protocol.md``, "Topics"):

* a topic is visible to anyone when open (without a token too, while
  ``topics.anonymous_read``: then without its subscribers' ids), to its members, owner and
  admins when private; an invisible topic is answered as unknown (404), never 403;
* creating one takes an admin when ``topics.create = "admins"``;
* its owner and admins change its settings, delete it, add and remove members; a client
  subscribes itself to an open topic, and leaves any topic it is in;
* its history is for those who may subscribe to it (open) or are in it (private).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import field, frozen
from quart import request
from quart_trio import QuartTrio

from ._api import canonical_uuid, parse_body
from ._config import TopicsConfig
from ._engine import Engine, PublishPolicy, TopicAccess, TopicRecord
from ._errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    StoreUnavailable,
    ValidationError,
)
from ._openapi import api
from ._relay.frames import valid_topic_id
from ._structure import field_error
from ._tokens import Claims

# Subscribers a topic's page lists at most (the rest: GET /topics/{id}/subscribers).
SUBSCRIBERS_SHOWN = 1000
MAX_PAGE = 1000
MAX_METADATA_BYTES = 4096


# Each raises the field's own error, so that the 422 names the field (relayd/_structure.py).
def _check_id(_: object, attribute: Any, value: str) -> None:
    if not valid_topic_id(value):
        raise field_error(
            attribute,
            "must be 1 to 100 letters, digits and . _ : @ ~ -, starting with a letter or digit",
        )


def _check_metadata(_: object, attribute: Any, value: dict[str, Any] | None) -> None:
    if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise field_error(attribute, f"must be at most {MAX_METADATA_BYTES} bytes as JSON")


def _check_count(_: object, attribute: Any, value: int | None) -> None:
    if value is not None and value < 0:
        raise field_error(attribute, "must be 0 or more")


def _check_age(_: object, attribute: Any, value: float | None) -> None:
    if value is not None and not 0 < value < math.inf:
        raise field_error(attribute, "must be a positive number of seconds")


@frozen(kw_only=True)
class TopicSettings:
    """What a topic's owner may set (each ``None``: unchanged, or the server's default)."""

    metadata: dict[str, Any] | None = field(default=None, validator=_check_metadata)
    access: TopicAccess | None = None
    publish: PublishPolicy | None = None
    presence: bool | None = None
    history_count: int | None = field(default=None, validator=_check_count)
    history_age: float | None = field(default=None, validator=_check_age)


@frozen(kw_only=True)
class CreateTopicRequest(TopicSettings):
    """``POST /topics/create`` (the seed system's body, and relayd's settings)."""

    topic_id: str = field(validator=_check_id)


@frozen(kw_only=True)
class TopicRequest:
    """``POST /topics/subscribe`` and ``/unsubscribe``."""

    topic_id: str = field(validator=_check_id)


# --- answers (OpenAPI) --------------------------------------------------------------------------


@frozen
class Topic:
    id: str
    topic_id: str
    creator: str
    metadata: dict[str, Any]
    access: str
    publish: str
    presence: bool
    history_count: int
    history_age: float
    created_at: float
    subscriber_count: int
    last_offset: int
    subscribed: bool | None = None
    subscribers: list[str] | None = None


@frozen
class TopicCreated:
    message: str
    topic_id: str
    creator: str
    topic: Topic


@frozen
class Topics:
    count: int
    topics: list[Topic]


@frozen
class Subscription:
    message: str
    topic_id: str
    client_uuid: str
    subscribed: bool


@frozen
class Subscribers:
    topic_id: str
    subscribers: list[str]


@frozen
class TopicPresence:
    topic_id: str
    online: list[str]
    next: str | None


@frozen
class TopicMessageEntry:
    offset: int
    msgid: str
    sender: str
    accepted_at: float
    message: dict[str, Any]


@frozen
class TopicMessages:
    topic_id: str
    messages: list[TopicMessageEntry]
    next: int
    last_offset: int


@frozen
class TopicDeleted:
    message: str
    topic_id: str


def topic_json(topic: TopicRecord) -> dict[str, Any]:
    """A topic as the routes show it (``id`` as the seed's list has it, ``topic_id`` too)."""
    return {
        "id": topic.id,
        "topic_id": topic.id,
        "creator": topic.creator,
        "metadata": json.loads(topic.metadata),
        "access": topic.access,
        "publish": topic.publish,
        "presence": topic.presence,
        "history_count": topic.history_count,
        "history_age": topic.history_age,
        "created_at": topic.created_at,
        "subscriber_count": topic.subscribers,
        "last_offset": topic.last_offset,
    }


def _int_arg(name: str, default: int, *, low: int, high: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(name, "must be an integer") from None
    if not low <= value <= high:
        raise ValidationError(name, f"must be from {low} to {high}")
    return value


def _topic_id(value: str) -> str:
    if not valid_topic_id(value):
        raise NotFound("no such topic", code="TOPIC_NOT_FOUND", details={"topic_id": value[:100]})
    return value


def serve_topics(
    app: QuartTrio,
    store: Engine,
    topics: Callable[[], TopicsConfig],
    authenticated: Callable[..., Awaitable[Claims]],
    is_admin: Callable[[Claims], bool],
    permits: Callable[[Claims, str], bool],
    now: Callable[[], float],
    json_body: Callable[[], Awaitable[dict[str, Any]]],
    relay: Callable[[], Any],
    may_reach: Callable[[Claims, str], Awaitable[None]],
) -> None:
    """Install the topics' routes. ``topics()``: the ``[topics]`` settings now (a reload
    changes them); ``is_admin(claims)``: whether the caller's roles make it an admin now;
    ``permits(claims, grant)``: whether they grant ``create_topics`` or ``presence``;
    ``json_body()``: the request's JSON object, checked as every route's is; ``relay()``: the
    relay (``None`` without one), told of every change of membership and settings;
    ``may_reach(claims, uuid)``: refuses (403) a caller whose roles may not message the
    client (an owner adds as members only those it may message)."""

    def settings_changed(topic: str, presence: bool | None) -> None:
        hub = relay()
        if hub is not None:
            hub.topic_changed(topic, presence)

    def changed(topic: TopicRecord, client: str, *, joined: bool) -> None:
        hub = relay()
        if hub is not None:
            hub.membership_changed(topic.id, client, joined=joined, presence=topic.presence)

    async def caller(*, anonymous: bool = False) -> Claims | None:
        """The caller's claims (``?token=`` accepted); ``None`` for a request without a token
        where ``anonymous`` reads are allowed."""
        has_token = "token" in request.args or "Authorization" in request.headers
        if not has_token and anonymous and topics().anonymous_read:
            return None
        return await authenticated(query_token=True)

    async def visible(topic_id: str, claims: Claims | None) -> tuple[TopicRecord, bool]:
        """The topic and whether the caller subscribes to it.

        Raises:
            NotFound: no such topic, or the caller may not see it (``TOPIC_NOT_FOUND``).
        """
        topic = await store.get_topic(_topic_id(topic_id))
        if topic is not None:
            member = claims is not None and await store.is_subscribed(topic.id, claims.sub)
            if topic.access == "open" or (claims is not None and (member or owns(claims, topic))):
                return topic, member
        raise NotFound("no such topic", code="TOPIC_NOT_FOUND", details={"topic_id": topic_id})

    def refuse_unless(claims: Claims, grant: str) -> None:
        if not permits(claims, grant):
            raise Forbidden(
                f"your roles do not grant {grant!r}",
                code="not_permitted",
                details={"permission": grant, "roles": list(claims.roles)},
            )

    def owns(claims: Claims, topic: TopicRecord) -> bool:
        return claims.sub == topic.creator or is_admin(claims)

    async def owned(topic_id: str) -> tuple[Claims, TopicRecord]:
        """The topic, for its owner or an admin.

        Raises:
            NotFound: as :func:`visible`.
            Forbidden: the caller sees the topic but does not own it (``not_owner``).
        """
        claims = await caller()
        assert claims is not None
        topic, _ = await visible(topic_id, claims)
        if not owns(claims, topic):
            raise Forbidden(
                "only the topic's owner or an admin may do this",
                code="not_owner",
                details={"topic_id": topic.id},
            )
        return claims, topic

    def settings_of(body: TopicSettings) -> dict[str, Any]:
        """The settings given, checked against the server's limits."""
        limits = topics()
        if body.history_count is not None and body.history_count > limits.max_history_count:
            raise ValidationError("history_count", f"must be at most {limits.max_history_count}")
        if body.history_age is not None and body.history_age > limits.max_history_age:
            raise ValidationError(
                "history_age", f"must be at most {limits.max_history_age:g} seconds"
            )
        return {
            "metadata": None if body.metadata is None else json.dumps(body.metadata),
            "access": body.access,
            "publish": body.publish,
            "presence": body.presence,
            "history_count": body.history_count,
            "history_age": body.history_age,
        }

    @app.post("/topics/create")
    @api(["topics"], TopicCreated, body=CreateTopicRequest, errors=(400, 403, 409), bearer=True)
    async def create_topic() -> dict[str, Any]:
        """Create a topic, owned by the caller (seed-compatible; ``?token=`` accepted)."""
        claims = await caller()
        assert claims is not None
        body = parse_body(await json_body(), CreateTopicRequest)
        limits = topics()
        if limits.create == "admins" and not is_admin(claims):
            raise Forbidden("only admins create topics here", code="admin_required")
        refuse_unless(claims, "create_topics")
        given = {k: v for k, v in settings_of(body).items() if v is not None}
        topic = TopicRecord(
            id=body.topic_id,
            creator=claims.sub,
            metadata=given.get("metadata", "{}"),
            access=given.get("access", "open"),
            publish=given.get("publish", "members"),
            presence=given.get("presence", False),
            history_count=given.get("history_count", limits.history_count),
            history_age=given.get("history_age", limits.history_age),
            created_at=now(),
        )
        outcome = await store.create_topic(topic, max_owned=limits.max_owned)
        if outcome == "created":
            settings_changed(topic.id, None)  # a deleted namesake's members are in no more
        if outcome == "exists":
            raise BadRequest(  # the seed system's status and code
                "a topic with this id exists",
                code="TOPIC_ALREADY_EXISTS",
                details={"topic_id": body.topic_id},
            )
        if outcome == "too_many":
            raise Conflict(
                f"a client may own at most {limits.max_owned} topics",
                code="too_many_topics",
                details={"max_owned": limits.max_owned},
            )
        return {
            "message": "Topic created successfully",
            "topic_id": topic.id,
            "creator": topic.creator,
            "topic": topic_json(topic),
        }

    @app.get("/topics")
    @api(["topics"], Topics, errors=(422,), bearer=True)
    async def list_topics() -> dict[str, Any]:
        """Topics the caller may see, by id (``?after=<id>&limit=``, at most 1000 a page).
        Without a token (``topics.anonymous_read``): the open ones."""
        claims = await caller(anonymous=True)
        limit = _int_arg("limit", 100, low=1, high=MAX_PAGE)
        after = request.args.get("after")
        found = await store.list_topics(
            None if claims is None else claims.sub,
            everything=claims is not None and is_admin(claims),
            after=after,
            limit=limit,
        )
        return {"count": len(found), "topics": [topic_json(t) for t in found]}

    @app.get("/topics/<topic_id>")
    @api(["topics"], Topic, errors=(404,), bearer=True)
    async def get_topic(topic_id: str) -> dict[str, Any]:
        """A topic, with its first 1000 subscribers' ids for those who may see them
        (seed-compatible; without a token: an open topic, without subscribers)."""
        claims = await caller(anonymous=True)
        topic, member = await visible(topic_id, claims)
        doc = topic_json(topic)
        if claims is not None:
            doc["subscribed"] = member
            doc["subscribers"] = await store.topic_subscribers(
                topic.id, after=None, limit=SUBSCRIBERS_SHOWN
            )
        return doc

    @app.get("/topics/<topic_id>/subscribers")
    @api(["topics"], Subscribers, errors=(404, 422), bearer=True)
    async def list_subscribers(topic_id: str) -> dict[str, Any]:
        """A topic's subscribers, by uuid (``?after=<uuid>&limit=``, at most 1000 a page)."""
        claims = await caller()
        topic, _ = await visible(topic_id, claims)
        limit = _int_arg("limit", 1000, low=1, high=MAX_PAGE)
        after = request.args.get("after")
        found = await store.topic_subscribers(topic.id, after=after, limit=limit)
        return {"topic_id": topic.id, "subscribers": found}

    @app.patch("/topics/<topic_id>")
    @api(["topics"], Topic, body=TopicSettings, errors=(403, 404), bearer=True)
    async def update_topic(topic_id: str) -> dict[str, Any]:
        """Change a topic's settings (its owner or an admin)."""
        _, topic = await owned(topic_id)
        body = parse_body(await json_body(), TopicSettings)
        changed = await store.update_topic(topic.id, **settings_of(body))
        if changed is None:
            raise NotFound("no such topic", code="TOPIC_NOT_FOUND", details={"topic_id": topic_id})
        if body.presence is not None:
            settings_changed(changed.id, changed.presence)
        return topic_json(changed)

    @app.delete("/topics/<topic_id>")
    @api(["topics"], TopicDeleted, errors=(403, 404), bearer=True)
    async def delete_topic(topic_id: str) -> dict[str, Any]:
        """Delete a topic, its subscriptions and its history (its owner or an admin).
        Deliveries of its messages that wait still go out."""
        _, topic = await owned(topic_id)
        if not await store.delete_topic(topic.id):
            raise NotFound("no such topic", code="TOPIC_NOT_FOUND", details={"topic_id": topic_id})
        settings_changed(topic.id, None)
        return {"message": "Topic deleted", "topic_id": topic.id}

    async def join(topic: TopicRecord, client: str, *, invited: bool) -> bool:
        """Subscribe ``client``: ``False`` if it was already.

        Raises:
            NotFound, Forbidden, Conflict: refused (the codes of docs/protocol.md).
        """
        limits = topics()
        outcome = await store.subscribe(
            topic.id,
            client,
            now(),
            max_subscribers=limits.max_subscribers,
            max_subscriptions=limits.max_subscriptions,
            invited=invited,
        )
        details = {"topic_id": topic.id}
        if outcome == "topic_not_found":
            raise NotFound("no such topic", code="TOPIC_NOT_FOUND", details=details)
        if outcome == "unknown_client":
            raise NotFound("no such client", code="unknown_client", details={"uuid": client})
        if outcome == "private":
            raise Forbidden(
                "this topic is private: its owner adds its members",
                code="topic_private",
                details=details,
            )
        if outcome == "topic_full":
            raise Conflict(
                f"this topic has its {limits.max_subscribers} subscribers",
                code="topic_full",
                details={**details, "max_subscribers": limits.max_subscribers},
            )
        if outcome == "too_many":
            raise Conflict(
                f"a client may subscribe to at most {limits.max_subscriptions} topics",
                code="too_many_subscriptions",
                details={**details, "max_subscriptions": limits.max_subscriptions},
            )
        if outcome == "subscribed":
            changed(topic, client, joined=True)
        return outcome == "subscribed"

    @app.post("/topics/subscribe")
    @api(["topics"], Subscription, body=TopicRequest, errors=(403, 404, 409), bearer=True)
    async def subscribe() -> dict[str, Any]:
        """Subscribe the caller (seed-compatible; subscribing again changes nothing). A
        private topic takes only the members its owner adds; its owner may subscribe."""
        claims = await caller()
        assert claims is not None
        body = parse_body(await json_body(), TopicRequest)
        topic, _ = await visible(body.topic_id, claims)
        new = await join(topic, claims.sub, invited=owns(claims, topic))
        return {
            "message": f"Subscribed to topic {topic.id}" if new else "Already subscribed",
            "topic_id": topic.id,
            "client_uuid": claims.sub,
            "subscribed": True,
        }

    @app.post("/topics/unsubscribe")
    @api(["topics"], Subscription, body=TopicRequest, errors=(404,), bearer=True)
    async def unsubscribe() -> dict[str, Any]:
        """Unsubscribe the caller (seed-compatible; leaving a topic one is not in changes
        nothing). Deliveries already waiting for it still come."""
        claims = await caller()
        assert claims is not None
        body = parse_body(await json_body(), TopicRequest)
        topic, _ = await visible(body.topic_id, claims)
        outcome = await store.unsubscribe(topic.id, claims.sub)
        if outcome == "unsubscribed":
            changed(topic, claims.sub, joined=False)
        return {
            "message": f"Unsubscribed from topic {topic.id}"
            if outcome == "unsubscribed"
            else "Not subscribed",
            "topic_id": topic.id,
            "client_uuid": claims.sub,
            "subscribed": False,
        }

    @app.put("/topics/<topic_id>/members/<client_uuid>")
    @api(["topics"], Subscription, errors=(403, 404, 409), bearer=True)
    async def add_member(topic_id: str, client_uuid: str) -> dict[str, Any]:
        """Add a member (subscriber) to a topic, private or open (its owner or an admin)."""
        claims, topic = await owned(topic_id)
        client = _uuid(client_uuid)
        if client != claims.sub:
            await may_reach(claims, client)
        new = await join(topic, client, invited=True)
        return {
            "message": "Member added" if new else "Already a member",
            "topic_id": topic.id,
            "client_uuid": client,
            "subscribed": True,
        }

    @app.delete("/topics/<topic_id>/members/<client_uuid>")
    @api(["topics"], Subscription, errors=(403, 404), bearer=True)
    async def remove_member(topic_id: str, client_uuid: str) -> dict[str, Any]:
        """Remove a member from a topic (its owner or an admin; or the member itself)."""
        client = _uuid(client_uuid)
        claims = await caller()
        assert claims is not None
        if claims.sub == client:
            topic, _ = await visible(topic_id, claims)
        else:
            _, topic = await owned(topic_id)
        outcome = await store.unsubscribe(topic.id, client)
        if outcome == "unsubscribed":
            changed(topic, client, joined=False)
        if outcome == "not_subscribed":
            raise NotFound(
                "not a member of this topic",
                code="not_subscribed",
                details={"topic_id": topic.id, "uuid": client},
            )
        return {
            "message": "Member removed",
            "topic_id": topic.id,
            "client_uuid": client,
            "subscribed": False,
        }

    @app.get("/topics/<topic_id>/presence")
    @api(["topics"], TopicPresence, errors=(403, 404, 409, 422, 503), bearer=True)
    async def topic_presence(topic_id: str) -> dict[str, Any]:
        """Which of a topic's subscribers have a live socket now (on any node): a page of its
        subscribers (``?after=<uuid>&limit=``, at most 1000) filtered to those online;
        ``next`` is the ``after`` of the next page (``null``: the last). Only for a topic with
        presence on, and for those who may see it."""
        claims = await caller()
        assert claims is not None
        refuse_unless(claims, "presence")
        topic, _ = await visible(topic_id, claims)
        if not topic.presence:
            raise Conflict(
                "this topic does not keep presence (its owner may turn it on)",
                code="presence_off",
                details={"topic_id": topic.id},
            )
        hub = relay()
        if hub is None:
            raise StoreUnavailable("the relay is not running")
        limit = _int_arg("limit", 1000, low=1, high=MAX_PAGE)
        page = await store.topic_subscribers(topic.id, after=request.args.get("after"), limit=limit)
        online = await hub.online(page)
        return {
            "topic_id": topic.id,
            "online": [client for client in page if client in online],
            "next": page[-1] if len(page) == limit else None,
        }

    @app.get("/topics/<topic_id>/messages")
    @api(["topics"], TopicMessages, errors=(403, 404, 422), bearer=True)
    async def topic_messages(topic_id: str) -> dict[str, Any]:
        """A topic's history after offset ``since`` (0: from its oldest kept), oldest first,
        at most ``limit`` (1000) a page; ``next`` is the ``since`` of the next page. For those
        who may subscribe (open) or are in it (private)."""
        claims = await caller()
        topic, _ = await visible(topic_id, claims)
        since = _int_arg("since", 0, low=0, high=2**62)
        limit = _int_arg("limit", 100, low=1, high=MAX_PAGE)
        found = await store.topic_messages(topic.id, since=since, limit=limit, now=now())
        return {
            "topic_id": topic.id,
            "messages": [
                {
                    "offset": m.offset,
                    "msgid": m.msgid,
                    "sender": m.sender,
                    "accepted_at": m.accepted_at,
                    "message": json.loads(m.fields) if m.fields else {},
                }
                for m in found
            ],
            "next": found[-1].offset if found else since,
            "last_offset": topic.last_offset,
        }


def _uuid(value: str) -> str:
    try:
        return canonical_uuid(value)
    except ValueError:
        raise NotFound(
            "no such client", code="unknown_client", details={"uuid": value[:64]}
        ) from None
