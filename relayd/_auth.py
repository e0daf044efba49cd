"""Registration, logins, refresh rotation, revocation and access-token checks.

The :class:`AuthService` is the only place that decides whether a token is good: the signature
and claims (:class:`~relayd._tokens.TokenCodec`), then the state only the store knows: the
client still exists, the token was issued after the client's last "revoke all", its login
(refresh family) was not revoked, the jti was not revoked, and for refresh tokens that the
presented token is its family's newest one.

Every revocation is also announced, as a :class:`Revocation`, to the subscribers (the relay),
which close the live sessions that use a revoked token at once: a revocation never waits for
an access token to expire.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
import uuid as uuid_module
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
from attrs import frozen

from . import _kdf
from ._config import AuthConfig, Config
from ._engine import ClientRecord, ClientStore, InviteRecord
from ._errors import ConfigError, Conflict, Forbidden, NotFound, TokenError, Unauthorized
from ._log import audit
from ._tokens import Claims, IssuedToken, TokenCodec, check_secret

log = logging.getLogger("relayd.auth")

SECRET_FILE_NAME = "signing-secret"
CLIENT_ROLES = ("client",)
INVITE_PREFIX = "rinv_"
SPENT_INVITES_KEPT = 30 * 86_400.0  # spent invites stay listed (who used which) this long


def invite_id_of(code: str) -> str:
    """What the store keeps of an invite code: its SHA-256, in hex."""
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def load_signing_secret(
    config: Config, environ: Mapping[str, str], *, generate: bool = True
) -> tuple[bytes | None, str]:
    """Find the HS256 signing secret; return it and where it came from.

    In order: ``$RELAYD_SECRET``; the file named by ``auth.secret_file``; the file relayd
    generated in ``state_dir`` on an earlier start; else, if ``generate``, a new random secret
    is written there (mode 0600) and a warning logged. There is no default secret. With
    ``generate=False`` and nothing found, the secret is ``None``.

    Raises:
        ConfigError: a configured secret is shorter than 32 bytes, is a PEM or SSH key, or its
            file is unreadable.
    """
    if environ.get("RELAYD_SECRET"):
        secret = environ["RELAYD_SECRET"].encode("utf-8")
        origin = "$RELAYD_SECRET"
    elif config.auth.secret_file:
        path = Path(config.auth.secret_file)
        try:
            secret = path.read_bytes().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"auth.secret_file: cannot read {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("signing secret file %s is readable by other users; chmod 600 it", path)
        origin = str(path)
    else:
        path = config.state_path / SECRET_FILE_NAME
        if path.exists() or not generate:
            secret = path.read_bytes().strip() if path.exists() else b""
            origin = str(path) if path.exists() else f"{path} (generated on first start)"
            if not generate and not secret:
                return None, origin
        else:
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise ConfigError(f"state_dir: cannot create {path}: {exc.strerror}") from None
            secret = secrets.token_urlsafe(48).encode("ascii")
            with os.fdopen(fd, "wb") as fh:
                fh.write(secret + b"\n")
            log.warning(
                "no signing secret configured: generated %s. Keep that file (tokens die with "
                "it) or set RELAYD_SECRET / auth.secret_file for production",
                path,
            )
            origin = str(path)
    try:
        check_secret(secret)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return secret, origin


def normalize_uuid(value: str) -> str:
    """The canonical lowercase, hyphenated form, or ``ValueError``."""
    return str(uuid_module.UUID(value))


@frozen
class TokenPair:
    access: IssuedToken
    refresh: IssuedToken

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "access_token": self.access.token,
            "refresh_token": self.refresh.token,
            "token_type": "bearer",
            "expires_in": round(self.access.claims.exp - now),
            "expires_at": self.access.claims.exp,
            "refresh_expires_in": round(self.refresh.claims.exp - now),
            "refresh_expires_at": self.refresh.claims.exp,
        }


@frozen
class Revocation:
    """Tokens of ``client`` that are refused from now on: all of them, those of one login
    (``family``), or one access token (``token_id``, its jti)."""

    client: str
    reason: str  # revoked, deleted, logged_out, refresh_reused, token_revoked, secret_*
    family: str | None = None
    token_id: str | None = None


@frozen
class Registration:
    client: ClientRecord
    client_secret: str
    tokens: TokenPair


class AuthService:
    def __init__(
        self,
        store: ClientStore,
        codec: TokenCodec,
        config: AuthConfig,
        *,
        default_roles: tuple[str, ...] = CLIENT_ROLES,
    ) -> None:
        self._store = store
        self.codec = codec
        self.config = config
        self.default_roles = default_roles
        self._revoked_jtis: set[str] = set()
        # Access tokens accepted, by each role their holder had (operators: "operator").
        self.authenticated: Counter[str] = Counter()
        self._subscribers: list[Callable[[Revocation], None]] = []
        # (subscriber, only the changes made on this node)
        self._role_subscribers: list[
            tuple[Callable[[str, tuple[str, ...] | None], None], bool]
        ] = []
        # scrypt holds ~16 MiB and a core for tens of ms: two at a time at most.
        self._kdf_limiter = trio.CapacityLimiter(2)
        # Compared against when the client does not exist, so a miss costs as much as a hit.
        self._decoy_hash = _kdf.hash_secret(_kdf.new_client_secret(), n=config.kdf_cost)

    @property
    def now(self) -> float:
        return self.codec.clock()

    def subscribe(self, subscriber: Callable[[Revocation], None]) -> None:
        """Call ``subscriber`` with every revocation, once it is committed to the store."""
        self._subscribers.append(subscriber)

    def _announce(self, revocation: Revocation) -> None:
        for subscriber in self._subscribers:
            subscriber(revocation)

    def subscribe_roles(
        self,
        subscriber: Callable[[str, tuple[str, ...] | None], None],
        *,
        local_only: bool = False,
    ) -> None:
        """Call ``subscriber(client, roles)`` whenever a client's roles are stored: at its
        registration, when an admin changes them, and with ``None`` when it is deleted.
        ``local_only``: not for changes another node made (cluster mode: the one that tells
        the other nodes)."""
        self._role_subscribers.append((subscriber, local_only))

    def _announce_roles(
        self, client: str, roles: tuple[str, ...] | None, *, local: bool = True
    ) -> None:
        for subscriber, local_only in self._role_subscribers:
            if local or not local_only:
                subscriber(client, roles)

    def is_revoked(self, token_id: str) -> bool:
        """Whether the access token with this jti was revoked (as far as this node knows)."""
        return token_id in self._revoked_jtis

    def revoked_elsewhere(self, revocation: Revocation) -> None:
        """Cluster mode: another node revoked tokens (and stored it). An access token revoked
        by its jti is refused here too from now on; the rest is checked in the store."""
        if revocation.token_id is not None:
            self._revoked_jtis.add(revocation.token_id)

    def roles_changed_elsewhere(self, client: str, roles: tuple[str, ...] | None) -> None:
        """Cluster mode: another node stored ``client``'s roles (``None``: deleted)."""
        self._announce_roles(client, roles, local=False)

    def _revocation_horizon(self) -> float:
        # The codec accepts a token until exp + leeway: its revocation must last as long.
        return self.now - self.codec.leeway

    async def load(self) -> None:
        """Load revocation state from the store. Call once before serving."""
        self._revoked_jtis = await self._store.revoked_token_ids(self._revocation_horizon())

    async def purge(self) -> int:
        """Forget what can no longer matter: expired refresh families and revocations of
        expired tokens. Returns the number of families purged."""
        families = await self._store.purge_expired_families(self.now)
        await self._store.purge_invites(self.now, keep_spent=SPENT_INVITES_KEPT)
        await self.reload_revocations()
        return families

    async def reload_revocations(self) -> None:
        """Take the revoked access tokens from the store again: those that expired are
        forgotten, and in cluster mode those another node revoked are taken, even when its
        hint was lost. Cancelled or failed: nothing changed.

        Raises:
            StoreError: the store did not answer.
        """
        before = set(self._revoked_jtis)
        live = await self._store.revoked_token_ids(self._revocation_horizon())
        # The store's, plus those revoked here while it was queried.
        self._revoked_jtis = live | (self._revoked_jtis - before)

    async def _hash(self, secret: str) -> str:
        return await trio.to_thread.run_sync(
            partial(_kdf.hash_secret, secret, n=self.config.kdf_cost), limiter=self._kdf_limiter
        )

    async def _verify(self, secret: str, stored: str) -> bool:
        return await trio.to_thread.run_sync(
            _kdf.verify_secret, secret, stored, limiter=self._kdf_limiter
        )

    async def _issue_pair(
        self,
        client: ClientRecord,
        family: str | None = None,
        *,
        proof: str | None = None,
        token: Claims | None = None,
    ) -> TokenPair:
        """A token pair; without ``family``, a new login. ``proof``: the secret hash a
        login's secret was checked against, which the client must still hold; ``token``: the
        access token that proved it, which must still be unrevoked.

        Raises:
            Unauthorized: the client's secret changed since it was checked against ``proof``.
            TokenError: ``token`` was revoked since it was checked (``token_revoked``).
        """
        new_family = family is None
        family = family or secrets.token_urlsafe(16)
        access = self.codec.issue(
            sub=client.uuid,
            token_use="access",
            roles=client.roles,
            ttl=self.config.access_ttl,
            family=family,
        )
        refresh = self.codec.issue(
            sub=client.uuid,
            token_use="refresh",
            roles=client.roles,
            ttl=self.config.refresh_ttl,
            family=family,
        )
        if new_family and not await self._store.create_family(
            family,
            client.uuid,
            refresh.claims.jti,
            self.now,
            refresh.claims.exp,
            secret_hash=proof,
            token_issued_at=None if token is None else token.iat,
        ):
            if token is not None:
                raise TokenError("token_revoked", "the token was revoked")
            # Reset or rotated while the KDF checked the old secret: that secret is refused.
            raise Unauthorized("unknown client or wrong client secret", code="invalid_client")
        return TokenPair(access, refresh)

    # --- registration and login -------------------------------------------------------------

    async def register(
        self, name: str, uuid: str | None, *, invite: str | None = None, source: str | None
    ) -> Registration:
        """Register a new client; with ``invite``, spend that invite code in the same
        transaction.

        Raises:
            Conflict: the UUID was ever registered (``uuid_taken``).
            Forbidden: the invite code is unknown, spent or expired (``invite_invalid``).
        """
        client_uuid = uuid or str(uuid_module.uuid4())
        client_secret = _kdf.new_client_secret()
        secret_hash = await self._hash(client_secret)
        client = ClientRecord(
            uuid=client_uuid,
            name=name,
            secret_hash=secret_hash,
            roles=self.default_roles,
            created_at=self.now,
            # Tokens from any earlier holder of this UUID can never become valid again.
            tokens_valid_after=self.now,
        )
        invite_id = None if invite is None else invite_id_of(invite)
        outcome = await self._store.insert_client(client, invite=invite_id)
        if outcome == "uuid_taken":
            audit("register_conflict", client=client_uuid, source=source)
            raise Conflict(
                f"client {client_uuid} is already registered; log in with its secret at "
                "POST /auth/token, or register again with its client_secret",
                code="uuid_taken",
            )
        if outcome == "invite_invalid":
            audit("register_invite_refused", client=client_uuid, source=source)
            raise Forbidden(
                "the invite code is unknown, already used or expired", code="invite_invalid"
            )
        self._announce_roles(client_uuid, client.roles)
        tokens = await self._issue_pair(client)
        audit("register", client=client_uuid, source=source, invite=invite_id and invite_id[:12])
        return Registration(client, client_secret, tokens)

    async def reregister(
        self,
        name: str,
        client_uuid: str,
        *,
        client_secret: str | None,
        claims: Claims | None,
        source: str | None,
    ) -> tuple[ClientRecord, TokenPair] | None:
        """Registration of a UUID that may exist, with proof of ownership: the client's
        secret, or the claims of an access token already checked. An existing client gets a
        new login (token pair) and, if it changed, its new name. ``None`` if the UUID was never
        registered (the caller registers it as new).

        Raises:
            Unauthorized: ``client_secret`` is wrong (``invalid_client``).
            Conflict: the UUID belongs to a deleted client, or the token is another client's.
            TokenError: the token was revoked since it was checked (``token_revoked``).
        """
        client = await self._store.get_client(client_uuid)
        if client is None:
            return None
        if client.deleted_at is not None or (
            client_secret is None and (claims is None or claims.sub != client_uuid)
        ):
            audit("register_conflict", client=client_uuid, source=source)
            raise Conflict(
                f"client {client_uuid} is already registered and the token presented is not"
                " its own",
                code="uuid_taken",
            )
        if client_secret is not None and not await self._verify(client_secret, client.secret_hash):
            audit("login_failed", client=client_uuid, source=source)
            raise Unauthorized("unknown client or wrong client secret", code="invalid_client")
        if name != client.name:
            await self._store.rename_client(client_uuid, name)
            client = attrs.evolve(client, name=name)
        if client_secret is not None:
            tokens = await self._issue_pair(client, proof=client.secret_hash)
        else:
            tokens = await self._issue_pair(client, token=claims)
        audit("reregister", client=client_uuid, source=source)
        return client, tokens

    async def login(self, client_uuid: str, client_secret: str, *, source: str | None) -> TokenPair:
        """Exchange a client's UUID and secret for a new token pair (a new refresh family)."""
        client = await self._store.get_client(client_uuid)
        live = client is not None and client.deleted_at is None
        stored = client.secret_hash if client is not None and live else self._decoy_hash
        matches = await self._verify(client_secret, stored)
        if client is None or not live or not matches:
            audit("login_failed", client=client_uuid, source=source)
            raise Unauthorized("unknown client or wrong client secret", code="invalid_client")
        try:
            tokens = await self._issue_pair(client, proof=client.secret_hash)
        except Unauthorized:
            audit("login_failed", client=client_uuid, source=source)
            raise
        audit("token_issued", client=client_uuid, source=source)
        return tokens

    # --- refresh and logout -----------------------------------------------------------------

    async def _live_client(self, claims: Claims) -> ClientRecord:
        client, login_live = await self._store.token_holder(claims.sub, claims.family)
        if client is None or client.deleted_at is not None:
            raise TokenError("token_revoked", "the token's client no longer exists")
        if claims.iat < client.tokens_valid_after:
            raise TokenError("token_revoked", "the token was revoked")
        if not login_live:
            raise TokenError("token_revoked", "the token's login was revoked")
        return client

    async def refresh(self, refresh_token: str, *, source: str | None) -> TokenPair:
        """Rotate a refresh token: a new pair, the presented token spent.

        Presenting a token that was already rotated revokes its whole family and raises
        ``TokenError("refresh_reused")``: either the client or a thief holds a stolen copy.
        """
        claims = self.codec.verify(refresh_token, use="refresh")
        client = await self._live_client(claims)
        assert claims.family is not None
        tokens = await self._issue_pair(client, family=claims.family)
        outcome = await self._store.rotate_family(
            claims.family,
            claims.jti,
            tokens.refresh.claims.jti,
            self.now,
            tokens.refresh.claims.exp,
        )
        if outcome == "reused":
            audit("refresh_reuse_detected", client=client.uuid, source=source, family=claims.family)
            self._announce(Revocation(client.uuid, "refresh_reused", family=claims.family))
            raise TokenError(
                "refresh_reused",
                "this refresh token was already used; every token of its login is now revoked",
            )
        if outcome != "rotated":
            raise TokenError("token_revoked", "the refresh token was revoked")
        audit("token_refreshed", client=client.uuid, source=source)
        return tokens

    async def logout(self, refresh_token: str, *, source: str | None) -> bool:
        """Revoke the refresh token's family. ``False`` if it was already revoked."""
        claims = self.codec.verify(refresh_token, use="refresh")
        assert claims.family is not None
        revoked = await self._store.revoke_family(claims.family, self.now, "logout")
        audit("refresh_revoked", client=claims.sub, source=source, family=claims.family)
        if revoked:
            self._announce(Revocation(claims.sub, "logged_out", family=claims.family))
        return revoked

    # --- access tokens ----------------------------------------------------------------------

    async def authenticate(self, access_token: str) -> Claims:
        """Verify an access token and its revocation state; return its claims.

        Raises:
            TokenError: see :meth:`TokenCodec.verify`, plus ``token_revoked``.
        """
        claims = self.codec.verify(access_token, use="access")
        if claims.jti in self._revoked_jtis:
            raise TokenError("token_revoked", "the token was revoked")
        if claims.is_operator:
            self.authenticated["operator"] += 1
            return claims
        client = await self._live_client(claims)
        self.authenticated.update(client.roles)
        # The roles the client holds now, not those the token was issued with.
        return claims if client.roles == claims.roles else attrs.evolve(claims, roles=client.roles)

    def mint_operator_token(self, name: str, roles: tuple[str, ...], ttl: float) -> IssuedToken:
        """An access token for an operator (``sub`` = ``operator:<name>``), not a client."""
        return self.codec.issue(sub=f"operator:{name}", token_use="access", roles=roles, ttl=ttl)

    async def revoke_token(self, claims: Claims, *, actor: str, source: str | None) -> None:
        """Revoke one access token by its jti until it expires."""
        await self._store.revoke_token(claims.jti, claims.sub, self.now, claims.exp)
        self._revoked_jtis.add(claims.jti)
        audit("token_revoked", client=claims.sub, actor=actor, source=source)
        self._announce(Revocation(claims.sub, "token_revoked", token_id=claims.jti))

    # --- client secrets and invites ---------------------------------------------------------

    async def prove(self, client_uuid: str, client_secret: str, *, source: str | None) -> str:
        """Check a live client's secret (as a login does, at the same cost when it does not
        exist); return the hash it was checked against (``rotate_secret``'s ``proof``).
        Raises :class:`Unauthorized` (``invalid_client``)."""
        client = await self._store.get_client(client_uuid)
        live = client is not None and client.deleted_at is None
        stored = client.secret_hash if client is not None and live else self._decoy_hash
        if not await self._verify(client_secret, stored) or not live:
            audit("login_failed", client=client_uuid, source=source)
            raise Unauthorized("unknown client or wrong client secret", code="invalid_client")
        return stored

    async def rotate_secret(
        self,
        client_uuid: str,
        *,
        revoke_tokens: bool,
        actor: str,
        source: str | None,
        proof: str | None = None,
        token: Claims | None = None,
    ) -> tuple[str, TokenPair | None]:
        """A new secret for a live client (the caller checked the proof: ``proof``, the hash
        :meth:`prove` checked the secret against, or ``token``, the access token's claims;
        either must still hold when the new secret is stored). With ``revoke_tokens``, every
        token issued before is refused and its sessions closed (4003), and a new login is
        returned so the caller keeps going.

        Raises:
            NotFound: no such live client.
            Unauthorized: the secret changed (reset, rotated) since it was checked.
            TokenError: ``token`` was revoked (a reset) since it was checked.
        """
        client_secret = _kdf.new_client_secret()
        secret_hash = await self._hash(client_secret)
        revoke_at = self.now if revoke_tokens else None
        if not await self._store.set_secret(
            client_uuid,
            secret_hash,
            revoke_at=revoke_at,
            replacing=proof,
            token_issued_at=None if token is None else token.iat,
        ):
            if proof is not None:
                audit("login_failed", client=client_uuid, source=source)
                raise Unauthorized("unknown client or wrong client secret", code="invalid_client")
            if token is not None:
                await self._live_client(token)  # raises token_revoked if that is why
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        audit("secret_rotated", client=client_uuid, actor=actor, source=source)
        if not revoke_tokens:
            return client_secret, None
        self._announce(Revocation(client_uuid, "secret_rotated"))
        return client_secret, await self._issue_pair(await self.get_client(client_uuid))

    async def reset_secret(self, client_uuid: str, *, actor: str, source: str | None) -> str:
        """An admin's reset of a lost secret: a new one, returned once; every token issued
        before is refused and the client's sessions closed (4003).

        Raises:
            NotFound: no such live client.
        """
        client_secret = _kdf.new_client_secret()
        secret_hash = await self._hash(client_secret)
        if not await self._store.set_secret(client_uuid, secret_hash, revoke_at=self.now):
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        audit("secret_reset", client=client_uuid, actor=actor, source=source)
        self._announce(Revocation(client_uuid, "secret_reset"))
        return client_secret

    async def mint_invite(self, *, by: str, ttl: float | None) -> tuple[str, InviteRecord]:
        """A one-time invite code, shown once; only its SHA-256 is stored.

        Raises:
            Conflict: ``auth.max_open_invites`` invites are neither spent nor expired.
        """
        code = INVITE_PREFIX + secrets.token_urlsafe(24)
        now = self.now
        record = InviteRecord(
            invite_id_of(code), now, by, now + (ttl or self.config.invite_ttl), None, None
        )
        if not await self._store.create_invite(
            record.id,
            by=by,
            at=now,
            expires_at=record.expires_at,
            max_open=self.config.max_open_invites,
        ):
            raise Conflict(
                f"{self.config.max_open_invites} invites are open (auth.max_open_invites);"
                " wait for some to be used or to expire",
                code="too_many_invites",
            )
        audit("invite_minted", actor=by, invite=record.id[:12])
        return code, record

    async def list_invites(self) -> list[InviteRecord]:
        return await self._store.list_invites()

    # --- clients ----------------------------------------------------------------------------

    async def get_client(self, client_uuid: str) -> ClientRecord:
        client = await self._store.get_client(client_uuid)
        if client is None or client.deleted_at is not None:
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        return client

    async def list_clients(self) -> list[ClientRecord]:
        return await self._store.list_clients()

    async def revoke_client(self, client_uuid: str, *, actor: str, source: str | None) -> None:
        """Refuse every token the client holds now; it must log in again with its secret."""
        if not await self._store.revoke_client_tokens(client_uuid, self.now):
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        audit("client_revoked", client=client_uuid, actor=actor, source=source)
        self._announce(Revocation(client_uuid, "revoked"))

    async def delete_client(self, client_uuid: str, *, actor: str, source: str | None) -> None:
        """Delete a client. Its UUID stays taken, so nobody can register it and get its mail."""
        if not await self._store.delete_client(client_uuid, self.now):
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        audit("client_deleted", client=client_uuid, actor=actor, source=source)
        self._announce(Revocation(client_uuid, "deleted"))
        self._announce_roles(client_uuid, None)

    async def set_roles(
        self, client_uuid: str, roles: tuple[str, ...], *, actor: str, source: str | None
    ) -> ClientRecord:
        """Give a client ``roles`` (checked by the caller); they apply at once, to every
        route and to its live session.

        Raises:
            NotFound: no such live client.
        """
        if not await self._store.set_roles(client_uuid, roles):
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        audit(
            "roles_changed", client=client_uuid, actor=actor, source=source, roles=" ".join(roles)
        )
        self._announce_roles(client_uuid, roles)
        return await self.get_client(client_uuid)

    async def client_roles(self) -> dict[str, tuple[str, ...]]:
        """Every live client's roles."""
        return {c.uuid: c.roles for c in await self._store.list_clients()}
