"""Keeping a valid access token: refresh with rotation, log in again with the secret.

Rules (``docs/protocol.md``, Tokens):

1. A refresh token is presented at most once. Before it is sent, the store records it as
   ``refresh_in_flight``; the new pair is saved before either token of it is used. Whatever
   goes wrong in between (no answer, a crash), the old token is never presented again: the
   keeper logs in with the secret instead, which starts a new login. Presenting a spent token
   would make relayd revoke the whole login, and the live session with it (4003).
2. Only two failures leave the refresh token unspent and usable: relayd refused the request
   before reading it (429 ``rate_limited``) or the connection could not be opened.
3. A refresh token that relayd refuses (expired, revoked, reused) is dropped, and the keeper
   logs in with the secret. A refused secret (``invalid_client``) is final:
   :class:`AuthenticationError`.
4. When to refresh: :func:`refresh_due` ("two thirds into the token's life, or ``margin``
   seconds before it expires, whichever is later").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import attrs

from ._credentials import Credentials, CredentialStore, TokenPair
from ._errors import AuthenticationError, HttpError, ServerUnreachable

log = logging.getLogger("relayd.client")

# A refresh token this close to its expiry is not worth presenting: log in instead.
REFRESH_TOKEN_MARGIN = 30.0


def refresh_due(tokens: TokenPair, margin: float) -> float:
    """When (this machine's clock) to replace ``tokens``' access token.

    >>> pair = TokenPair("a", "r", access_expires_at=900.0, access_issued_at=0.0,
    ...                  refresh_expires_at=10**6)
    >>> refresh_due(pair, margin=60.0)
    840.0
    >>> short = TokenPair("a", "r", access_expires_at=3.0, access_issued_at=0.0,
    ...                   refresh_expires_at=10**6)
    >>> refresh_due(short, margin=60.0)
    2.0
    """
    lifetime = tokens.access_expires_at - tokens.access_issued_at
    return max(tokens.access_expires_at - margin, tokens.access_issued_at + lifetime * 2 / 3)


class TokenIssuer(Protocol):
    """relayd's token endpoints, as :class:`relayd.client.RestClient` calls them."""

    async def login(self, uuid: str, client_secret: str) -> TokenPair: ...

    async def refresh(self, refresh_token: str) -> TokenPair: ...


class TokenKeeper:
    """The client's tokens, kept in ``store`` and renewed through ``rest``.

    Not safe for concurrent use: the client renews from one task at a time (its lock).
    """

    def __init__(
        self,
        store: CredentialStore,
        rest: TokenIssuer,
        credentials: Credentials,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._rest = rest
        self.credentials = credentials
        self._clock = clock
        self._lock = anyio.Lock()

    async def access_token(self, margin: float) -> str:
        """An access token not yet due for renewal (:func:`refresh_due` with ``margin``)."""
        async with self._lock:
            tokens = self.credentials.tokens
            if tokens is not None and self._clock() < refresh_due(tokens, margin):
                return tokens.access_token
            return await self._renew()

    async def renew(self) -> str:
        """A new access token, whatever the current one's state (relayd refused it)."""
        async with self._lock:
            return await self._renew()

    async def _renew(self) -> str:
        pair = await self._refresh()
        if pair is None:
            pair = await self._login()
        return pair.access_token

    async def _refresh(self) -> TokenPair | None:
        """Rotate the refresh token; None when it cannot be used (then log in)."""
        credentials = self.credentials
        tokens = credentials.tokens
        if (
            tokens is None
            or credentials.refresh_in_flight
            or tokens.refresh_expires_at - self._clock() < REFRESH_TOKEN_MARGIN
        ):
            return None
        await self._save(attrs.evolve(credentials, refresh_in_flight=True))
        try:
            pair = await self._rest.refresh(tokens.refresh_token)
        except HttpError as exc:
            if exc.status == 429:
                await self._save(credentials)  # refused before it was read: still unspent
                raise
            log.info("refresh refused (%s): logging in with the secret", exc.code)
            return None
        except ServerUnreachable as exc:
            if not exc.maybe_delivered:
                await self._save(credentials)
                raise
            log.info("refresh unanswered: its token may be spent; logging in with the secret")
            return None
        await self._save(credentials.with_tokens(pair))
        return pair

    async def _login(self) -> TokenPair:
        credentials = self.credentials
        try:
            pair = await self._rest.login(credentials.uuid, credentials.client_secret)
        except HttpError as exc:
            if exc.status == 401:
                raise AuthenticationError(
                    f"relayd refused the secret of {credentials.name} ({credentials.uuid}):"
                    f" {exc.code}"
                ) from None
            raise
        await self._save(credentials.with_tokens(pair))
        return pair

    async def _save(self, credentials: Credentials) -> None:
        # Shielded: a new pair that relayd issued must reach the store even if the caller is
        # being cancelled, or its refresh token would be lost while the old one is spent.
        with anyio.CancelScope(shield=True), anyio.fail_after(10.0):
            await self._store.save(credentials)
        self.credentials = credentials
