"""relayd's REST API, as the SDK uses it: register, log in, refresh, the directory.

Built on httpx, which runs on anyio (so under asyncio and Trio alike). Every call has a
deadline (``timeout``); an error answer becomes :class:`HttpError` with relayd's ``code``, a
lost connection :class:`ServerUnreachable` saying whether the request may have arrived.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx
from attrs import frozen

from ._credentials import Credentials, TokenPair
from ._errors import HttpError, ServerUnreachable


@frozen
class DirectoryEntry:
    """A client in relayd's directory (``GET /clients``)."""

    uuid: str
    name: str
    created_at: float
    online: bool


@frozen
class PublicKey:
    """A public key from relayd's key directory. ``fingerprint`` is the SHA-256 of ``key``
    in hex, computed here (relayd's is checked against it)."""

    algorithm: str
    key: bytes
    fingerprint: str
    published_at: float
    superseded_at: float | None = None


@frozen
class PeerKeys:
    """A client's keys in the directory (``GET /clients/{uuid}/keys``): the current one per
    algorithm, and superseded ones, newest first."""

    uuid: str
    current: tuple[PublicKey, ...]
    superseded: tuple[PublicKey, ...]

    def get(self, algorithm: str) -> PublicKey | None:
        """The current key of ``algorithm``, if the client published one."""
        return next((k for k in self.current if k.algorithm == algorithm), None)


def _public_key(item: Any) -> PublicKey:
    """One key of a directory answer, its fingerprint recomputed.

    Raises:
        HttpError: ``invalid_response``: malformed, or relayd's fingerprint is not the key's.
    """
    try:
        raw = base64.b64decode(item["key"], validate=True)
        fingerprint = hashlib.sha256(raw).hexdigest()
        if item["fingerprint"] != fingerprint:
            raise HttpError(
                200, "invalid_response", "a key's fingerprint is not the SHA-256 of its bytes"
            )
        superseded = item.get("superseded_at")
        return PublicKey(
            algorithm=str(item["algorithm"]),
            key=raw,
            fingerprint=fingerprint,
            published_at=float(item["published_at"]),
            superseded_at=None if superseded is None else float(superseded),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise HttpError(200, "invalid_response", f"a malformed key ({exc!r})") from None


def _peer_keys(doc: dict[str, Any]) -> PeerKeys:
    try:
        return PeerKeys(
            uuid=str(doc["uuid"]),
            current=tuple(_public_key(k) for k in doc["keys"]),
            superseded=tuple(_public_key(k) for k in doc["superseded"]),
        )
    except (KeyError, TypeError) as exc:
        raise HttpError(200, "invalid_response", f"a malformed key listing ({exc!r})") from None


class RestClient:
    """A connection pool to relayd's REST API; close it (``async with``) when done.

    >>> async def example() -> None:
    ...     async with RestClient("http://127.0.0.1:8000") as rest:
    ...         credentials = await rest.register("alice")
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        verify: Any = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self._clock = clock
        # Proxies from the environment would see tokens in request bodies; relayd is reached
        # directly (a TLS-terminating proxy in front of it is just its URL).
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, verify=verify, trust_env=False
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def register(
        self,
        name: str,
        *,
        uuid: str | None = None,
        admin_token: str | None = None,
        invite: str | None = None,
    ) -> Credentials:
        """Register a client; return its credentials (secret and first tokens included).
        ``invite``: a one-time code, where relayd's registration is invite-only.

        Raises:
            HttpError: 409 ``uuid_taken``, 403 ``registration_closed`` / ``invite_required`` /
                ``invite_invalid``, 422, 429...
        """
        body: dict[str, Any] = {"name": name}
        if uuid is not None:
            body["uuid"] = uuid
        if invite is not None:
            body["invite"] = invite
        doc = await self._call("POST", "/register", json=body, token=admin_token)
        return Credentials(
            url=self.url,
            uuid=doc["uuid"],
            name=doc["name"],
            client_secret=doc["client_secret"],
            tokens=self._pair(doc),
        )

    async def login(self, uuid: str, client_secret: str) -> TokenPair:
        """A new login (refresh family) with the client's secret.

        Raises:
            HttpError: 401 ``invalid_client`` (unknown client or wrong secret), 429.
        """
        body = {"uuid": uuid, "client_secret": client_secret}
        return self._pair(await self._call("POST", "/auth/token", json=body))

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate: a new pair; ``refresh_token`` is spent once relayd has read the request,
        so never present it again, whatever this raises (but a 429 or a
        :class:`ServerUnreachable` with ``maybe_delivered`` false).

        Raises:
            HttpError: 401 ``token_expired``, ``token_revoked``, ``refresh_reused``...
            ServerUnreachable: no answer.
        """
        body = {"refresh_token": refresh_token}
        return self._pair(await self._call("POST", "/auth/refresh", json=body))

    async def revoke(self, *, refresh_token: str) -> None:
        """Log out: end the login ``refresh_token`` belongs to."""
        await self._call("POST", "/auth/revoke", json={"refresh_token": refresh_token})

    async def directory(self, access_token: str) -> list[DirectoryEntry]:
        """Every registered client, oldest first."""
        doc = await self._call("GET", "/clients", token=access_token)
        return [
            DirectoryEntry(
                uuid=item["uuid"],
                name=item["name"],
                created_at=float(item["created_at"]),
                online=bool(item.get("online", False)),
            )
            for item in doc["items"]
        ]

    async def publish_keys(
        self, access_token: str, uuid: str, keys: Mapping[str, bytes]
    ) -> tuple[PeerKeys, tuple[str, ...]]:
        """Publish this client's public ``keys`` (algorithm -> raw bytes): its keys as listed
        afterwards, and the algorithms whose key changed.

        Raises:
            HttpError: 403 ``not_yours``, 422 (a bad key), 429...
        """
        body = {
            "keys": [
                {"algorithm": algorithm, "key": base64.b64encode(raw).decode("ascii")}
                for algorithm, raw in keys.items()
            ]
        }
        doc = await self._call("PUT", f"/clients/{uuid}/keys", json=body, token=access_token)
        changed = doc.get("changed")
        if not isinstance(changed, list):
            raise HttpError(200, "invalid_response", "no 'changed' list")
        return _peer_keys(doc), tuple(str(a) for a in changed)

    async def keys(self, access_token: str, uuid: str) -> PeerKeys:
        """A client's keys in the directory; reading them makes this client one of its
        correspondents, told of its key changes (``key_changed``).

        Raises:
            HttpError: 404 ``unknown_client``, 429...
        """
        return _peer_keys(await self._call("GET", f"/clients/{uuid}/keys", token=access_token))

    def _pair(self, doc: dict[str, Any]) -> TokenPair:
        now = self._clock()
        return TokenPair(
            access_token=doc["access_token"],
            refresh_token=doc["refresh_token"],
            access_expires_at=now + float(doc["expires_in"]),
            access_issued_at=now,
            refresh_expires_at=now + float(doc["refresh_expires_in"]),
        )

    async def _call(
        self, method: str, path: str, *, json: Any = None, token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ServerUnreachable(
                f"{method} {path}: cannot reach relayd at {self.url} ({type(exc).__name__})",
                maybe_delivered=False,
            ) from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"{method} {path}: no answer from relayd at {self.url} ({type(exc).__name__})",
                maybe_delivered=True,
            ) from None
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.status_code != 200:
            raise _http_error(response, doc)
        if not isinstance(doc, dict):
            raise HttpError(response.status_code, "invalid_response", "not a JSON object")
        return doc


def _http_error(response: httpx.Response, doc: Any) -> HttpError:
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return HttpError(response.status_code, "http_error", response.reason_phrase)
    details = error.get("details")
    details = dict(details) if isinstance(details, dict) else {}
    retry = response.headers.get("Retry-After")
    if "retry_after" not in details and retry is not None and retry.isdigit():
        details["retry_after"] = int(retry)
    return HttpError(
        response.status_code, str(error.get("code")), str(error.get("message")), details
    )
