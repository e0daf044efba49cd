"""The end-to-end key directory: clients publish their public keys; others read them.

relayd treats end-to-end encrypted content as opaque: it only keeps the public keys, says
when each was published, and makes sure a key change is never silent.

Theory of operation:

* A client has at most one **current** key per algorithm (:data:`ALGORITHMS`). Publishing a
  different key for an algorithm **supersedes** the current one, which stays listed (with
  ``superseded_at``); the newest :data:`MAX_SUPERSEDED_KEYS` superseded keys of a client are
  kept, older ones dropped. Publishing the current key again changes nothing.
* A key's **fingerprint** is the SHA-256 of its bytes, in lowercase hex.
* A client's **correspondents** are the clients that read its keys (``GET``); the
  :data:`MAX_READERS` most recent readers of each client are remembered. When a current key is
  superseded, each correspondent is owed a ``key_changed`` notice, stored in the same
  transaction as the change, and the subscribers (the relay) are told at once: an online
  correspondent gets the frame on its live session, an offline one when it next connects. A
  notice is forgotten once its frame is written; one notice per (correspondent, client,
  algorithm) waits, the latest change, and at most :data:`MAX_NOTICES` per correspondent.
* A client's first key of an algorithm is not a change: there was nothing to be told about.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import attrs
from attrs import field, frozen

from ._api import converter
from ._engine import ClientStore, KeyRecord
from ._errors import NotFound
from ._log import audit
from ._relay.records import KeyNotice
from ._structure import FieldError, field_error

log = logging.getLogger("relayd.keys")

# Algorithm name -> length of its public key in bytes (both are Curve25519 points).
ALGORITHMS = {"x25519": 32, "ed25519": 32}
# Superseded keys kept per client: enough to show a history of rotations, bounded.
MAX_SUPERSEDED_KEYS = 16
# Correspondents remembered per client (the most recent readers): each costs a row, and a
# notice per key change.
MAX_READERS = 1024
# Key changes waiting per correspondent (oldest dropped): one per (client, algorithm) it read.
MAX_NOTICES = 256
# Base64 characters of a key: 32 bytes take 44; the bound spares decoding a huge string.
MAX_KEY_CHARS = 64


def fingerprint(key: bytes) -> str:
    """The SHA-256 of the key bytes, in lowercase hex."""
    return hashlib.sha256(key).hexdigest()


def _check_algorithm(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ALGORITHMS:
        choices = ", ".join(repr(a) for a in ALGORITHMS)
        raise field_error(attribute, f"must be one of {choices}, not {value[:32]!r}")


def _decode(value: str) -> bytes:
    if len(value) > MAX_KEY_CHARS:
        raise ValueError(f"must be at most {MAX_KEY_CHARS} characters of base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 (RFC 4648, with padding)") from None


@frozen(kw_only=True)
class KeyEntry:
    """One key of ``PUT /clients/{uuid}/keys``."""

    algorithm: str = field(validator=_check_algorithm)
    key: str

    def __attrs_post_init__(self) -> None:
        try:
            raw = _decode(self.key)
        except ValueError as exc:
            raise FieldError("key", str(exc)) from None
        size = ALGORITHMS[self.algorithm]
        if len(raw) != size:
            raise FieldError("key", f"an {self.algorithm} key is {size} bytes, not {len(raw)}")

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.key)


def _check_keys(_: object, attribute: attrs.Attribute[Any], value: list[KeyEntry]) -> None:
    if not value:
        raise field_error(attribute, "must hold at least one key")
    if len(value) > len(ALGORITHMS):
        raise field_error(attribute, f"must hold at most {len(ALGORITHMS)} keys")
    algorithms = [entry.algorithm for entry in value]
    if len(set(algorithms)) != len(algorithms):
        raise field_error(attribute, "must hold at most one key per algorithm")


@frozen(kw_only=True)
class PublishKeysRequest:
    """``PUT /clients/{uuid}/keys``: ``{"keys": [{"algorithm": ..., "key": ...}, ...]}``."""

    keys: list[KeyEntry] = field(validator=_check_keys)


_KeyList = list[KeyEntry]
_structure_list = converter.get_structure_hook(_KeyList)


def _structure_entries(value: Any, kind: type[Any]) -> list[KeyEntry]:
    # cattrs would iterate any iterable (a string, an object's keys) as the list.
    if not isinstance(value, list):
        raise TypeError(f"must be a list of keys, not {type(value).__name__}")
    entries: list[KeyEntry] = _structure_list(value, kind)
    return entries


converter.register_structure_hook_func(lambda kind: kind == _KeyList, _structure_entries)


def key_json(key: KeyRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "algorithm": key.algorithm,
        "key": base64.b64encode(key.key).decode("ascii"),
        "fingerprint": key.fingerprint,
        "published_at": key.published_at,
    }
    if key.superseded_at is not None:
        doc["superseded_at"] = key.superseded_at
    return doc


def keys_json(client_uuid: str, keys: list[KeyRecord]) -> dict[str, Any]:
    """The body of ``GET /clients/{uuid}/keys``."""
    return {
        "uuid": client_uuid,
        "keys": [key_json(k) for k in keys if k.superseded_at is None],
        "superseded": [key_json(k) for k in keys if k.superseded_at is not None],
    }


class KeyDirectory:
    """Publishing and reading keys (see the module docstring). Key changes are announced, as
    lists of :class:`KeyNotice`, to the subscribers once committed."""

    def __init__(self, store: ClientStore, *, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._subscribers: list[Callable[[list[KeyNotice]], None]] = []

    def subscribe(self, subscriber: Callable[[list[KeyNotice]], None]) -> None:
        """Call ``subscriber`` with the notices of every key change, once it is committed."""
        self._subscribers.append(subscriber)

    async def publish(self, client_uuid: str, entries: list[KeyEntry]) -> tuple[str, ...]:
        """Make ``entries`` the client's current keys; return the algorithms that changed.

        Raises:
            NotFound: ``unknown_client``.
        """
        now = self._clock()
        records = [KeyRecord(e.algorithm, e.raw, fingerprint(e.raw), now, None) for e in entries]
        publication = await self._store.publish_keys(
            client_uuid,
            records,
            now,
            max_superseded=MAX_SUPERSEDED_KEYS,
            max_notices=MAX_NOTICES,
        )
        if publication is None:
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        if publication.changed:
            audit(
                "keys_published",
                client=client_uuid,
                algorithms=",".join(publication.changed),
                notified=len(publication.notices),
            )
        if publication.notices:
            notices = list(publication.notices)
            for subscriber in self._subscribers:
                subscriber(notices)
        return publication.changed

    async def read(self, client_uuid: str, reader: str | None) -> list[KeyRecord]:
        """The client's keys, current then superseded; ``reader`` is remembered as one of its
        correspondents (``None``: an operator, who is not one).

        Raises:
            NotFound: ``unknown_client``.
        """
        keys = await self._store.read_keys(
            client_uuid, reader, self._clock(), max_readers=MAX_READERS
        )
        if keys is None:
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        return keys
