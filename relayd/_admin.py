"""``relayd admin`` and ``relayd backup``: operating relayd without reading its source.

``relayd admin`` talks to the running daemon's admin API (``http.listen`` from the config, or
``--url``) with a short-lived admin token it mints itself from the configured signing secret,
so the daemon's view (who is online, sessions closed on revocation) is used. When nothing
answers there, the state directory's lock (``relayd.lock``, see ``_lock.py``) decides: if a
``relayd serve`` holds it, the daemon runs but listens elsewhere (or is starting or stopping)
and the command is refused, naming it; else the command takes the lock, so that no daemon can
start under it, and uses the store directly: the same changes, made in the same transactions,
without the live part.

``relayd backup PATH`` copies the store with SQLite's online backup API: a consistent
snapshot, safe while the daemon runs (WAL readers do not block the writer).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _kdf
from ._atrest import key_file_path, new_key_id, parse_key_file, write_key_file
from ._auth import INVITE_PREFIX, invite_id_of
from ._config import Config
from ._engine import open_engine
from ._errors import RelaydError, StoreError
from ._lock import StateDirLocked, StateLock
from ._log import audit
from ._roles import RolePolicy
from ._tokens import TokenCodec

ADMIN_TOKEN_TTL = 60.0
ADMIN_ACTOR = "operator:relayd-admin"
HTTP_TIMEOUT = 10.0


class AdminError(RelaydError):
    """An admin command could not be carried out; the message says why."""


class DaemonDown(Exception):
    """Nothing answers at the daemon's address."""


def _url(config: Config, explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    host, _, port = config.http.listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


class Admin:
    """One admin session: the daemon's API if it answers, else the store.

    Use it as a context manager: once the store is used, the state directory's lock is held
    until the session ends.
    """

    def __init__(self, config: Config, codec: TokenCodec, url: str | None) -> None:
        self.config = config
        self.codec = codec
        self.base = _url(config, url)
        self.offline = False
        self._lock: StateLock | None = None

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the state directory's lock, if this session took it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- the daemon's API ---------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        token = self.codec.issue(
            sub=ADMIN_ACTOR, token_use="access", roles=("admin",), ttl=ADMIN_TOKEN_TTL
        ).token
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                doc: dict[str, Any] = json.load(response)
                return doc
        except urllib.error.HTTPError as exc:
            try:
                error = json.load(exc)["error"]
                message = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                message = str(exc)
            raise AdminError(f"{method} {path}: {exc.code} {message}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                raise DaemonDown from None
            raise AdminError(f"{self.base}: {exc.reason}") from None

    def _live(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        if self.offline:
            return None
        try:
            return self._call(method, path, body)
        except DaemonDown:
            self._take_over()
            return None

    def _take_over(self) -> None:
        """Nothing answers at the daemon's address: make sure no daemon works on the state
        directory, and keep it so while the store is used (the lock, held until ``close``).

        Raises:
            AdminError: a daemon holds the state directory; the message names it.
        """
        state = self.config.state_path
        if state.is_dir():  # else there is no daemon and no store: _store says so
            try:
                self._lock = StateLock.acquire(state, command="admin")
            except StateDirLocked as exc:
                raise AdminError(_held(self.base, exc)) from None
        self.offline = True

    # --- the store, when the daemon is stopped ------------------------------------------------

    def _store(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        path = self.config.store_path
        if self.config.store.engine == "sqlite":
            if path == ":memory:":
                raise AdminError("the daemon is not running and its store is :memory:")
            if not Path(path).exists():
                raise AdminError(f"the daemon is not running and there is no store at {path}")

        async def run() -> Any:
            async with open_engine(self.config) as store:
                return await getattr(store, operation)(*args, **kwargs)

        return trio.run(run)

    # --- commands -----------------------------------------------------------------------------

    def clients(self) -> list[dict[str, Any]]:
        live = self._live("GET", "/admin/clients")
        if live is not None:
            items: list[dict[str, Any]] = live["items"]
            return items
        records = self._store("list_clients")
        depths = self._store("queue_depths")
        return [
            {
                "uuid": c.uuid,
                "name": c.name,
                "created_at": c.created_at,
                "online": None,
                "roles": list(c.roles),
                "queued": depths.get(c.uuid, 0),
            }
            for c in records
        ]

    def queues(self) -> dict[str, int]:
        return {c["uuid"]: c["queued"] for c in self.clients() if c["queued"]}

    def revoke(self, client: str) -> None:
        if self._live("POST", f"/admin/clients/{client}/revoke") is not None:
            return
        if not self._store("revoke_client_tokens", client, time.time()):
            raise AdminError(f"no client {client}")
        audit("client_revoked", client=client, actor=ADMIN_ACTOR, source="store")

    def delete(self, client: str) -> None:
        if self._live("DELETE", f"/clients/{client}") is not None:
            return
        if not self._store("delete_client", client, time.time()):
            raise AdminError(f"no client {client}")
        audit("client_deleted", client=client, actor=ADMIN_ACTOR, source="store")

    def reset_secret(self, client: str) -> str:
        """A new secret for ``client`` (shown once); its tokens are refused from now on."""
        live = self._live("POST", f"/admin/clients/{client}/reset-secret", {})
        if live is not None:
            secret: str = live["client_secret"]
            return secret
        secret = _kdf.new_client_secret()
        digest = _kdf.hash_secret(secret, n=self.config.auth.kdf_cost)
        if not self._store("set_secret", client, digest, revoke_at=time.time()):
            raise AdminError(f"no client {client}")
        audit("secret_reset", client=client, actor=ADMIN_ACTOR, source="store")
        return secret

    def invite(self, ttl: float | None) -> dict[str, Any]:
        """Mint a one-time invite code: ``{"invite": code, "expires_at": ...}``."""
        live = self._live("POST", "/admin/invites", {} if ttl is None else {"ttl": ttl})
        if live is not None:
            return live
        code = INVITE_PREFIX + secrets.token_urlsafe(24)
        now = time.time()
        expires_at = now + (ttl or self.config.auth.invite_ttl)
        invite = invite_id_of(code)
        max_open = self.config.auth.max_open_invites
        if not self._store(
            "create_invite",
            invite,
            by=ADMIN_ACTOR,
            at=now,
            expires_at=expires_at,
            max_open=max_open,
        ):
            raise AdminError(f"{max_open} invites are open (auth.max_open_invites)")
        audit("invite_minted", actor=ADMIN_ACTOR, invite=invite[:12], source="store")
        return {"invite": code, "id": invite[:12], "expires_at": expires_at}

    def invites(self) -> list[dict[str, Any]]:
        live = self._live("GET", "/admin/invites")
        if live is not None:
            items: list[dict[str, Any]] = live["items"]
            return items
        return [i.to_json() for i in self._store("list_invites")]

    def set_roles(self, client: str, roles: list[str]) -> list[str]:
        """Give ``client`` ``roles`` (they apply at once to a running daemon)."""
        live = self._live("PUT", f"/admin/clients/{client}/roles", {"roles": roles})
        if live is not None:
            held: list[str] = live["roles"]
            return held
        policy = RolePolicy.from_config(self.config.roles)
        unknown = [role for role in roles if not policy.known(role)]
        if unknown:
            raise AdminError(f"{', '.join(unknown)}: not a role of this relayd ([roles] define)")
        if not self._store("set_roles", client, tuple(roles)):
            raise AdminError(f"no client {client}")
        audit(
            "roles_changed", client=client, actor=ADMIN_ACTOR, source="store", roles=" ".join(roles)
        )
        return roles

    # --- store keys ---------------------------------------------------------------------------

    def store_keys(self) -> dict[str, Any]:
        """What ``GET /admin/store-keys`` answers: the daemon's keys and the rows per key; when
        the daemon is stopped, the key file's keys and the store's rows."""
        live = self._live("GET", "/admin/store-keys")
        if live is not None:
            return live
        path, _ = key_file_path(self.config, os.environ)
        pairs = _read_key_file(path)
        rows = self._store("keys_in_use")
        return {
            "current": pairs[0][0],
            "from": str(path),
            "keys": [
                {"id": kid, "current": i == 0, "rows": rows.get(kid, 0)}
                for i, (kid, _) in enumerate(pairs)
            ],
            "plain_rows": rows.get(None, 0),
        }

    def rotate_store_key(self) -> str:
        """Add a new key at the top of the key file; return its id. The daemon encrypts with
        it once it reads the file again (SIGHUP)."""
        path = _writable_key_file(self.config)
        pairs = _read_key_file(path)
        kid = new_key_id()
        write_key_file(path, [(kid, AESGCM.generate_key(256)), *pairs])
        audit("store_key_added", actor=ADMIN_ACTOR, key=kid, source="cli")
        return kid

    def retire_store_key(self, kid: str) -> None:
        """Remove a key no message needs any more from the key file.

        Raises:
            AdminError: it is the current key (in the file or in the daemon), it is not in
                the file, or messages are still encrypted with it.
        """
        path = _writable_key_file(self.config)
        pairs = _read_key_file(path)
        if kid not in dict(pairs):
            raise AdminError(f"{path} has no key {kid!r}")
        if pairs[0][0] == kid:
            raise AdminError(f"{kid} is the current key; rotate first (relayd store-key rotate)")
        status = self.store_keys()
        if status["current"] == kid:
            raise AdminError(
                f"the running daemon still encrypts with {kid}: reload it first"
                " (systemctl reload relayd, or SIGHUP)"
            )
        rows = {k["id"]: k["rows"] for k in status["keys"]}.get(kid, 0)
        if rows:
            raise AdminError(
                f"{rows} stored messages are encrypted with {kid}; they leave the store once"
                " delivered or expired (relay.default_ttl): retire it then"
            )
        write_key_file(path, [(k, key) for k, key in pairs if k != kid])
        audit("store_key_retired", actor=ADMIN_ACTOR, key=kid, source="cli")


def _writable_key_file(config: Config) -> Path:
    path, _ = key_file_path(config, os.environ)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and path.parent == Path(credentials):
        raise AdminError(
            f"{path} is a systemd credential (read-only): change its source file, then restart"
        )
    return path


def _read_key_file(path: Path) -> list[tuple[str, bytes]]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read the store key file {path}: {exc}") from None
    return parse_key_file(text, str(path))


def _held(base: str, exc: StateDirLocked) -> str:
    if exc.holder is None or exc.holder.command != "serve":
        who = exc.holder.describe() if exc.holder else "another process"
        return f"{who} is working on the store ({exc.path} is locked); try again"
    return (
        f"nothing answers at {base}, but {exc.holder.describe()} holds {exc.path}: the daemon"
        " runs (or is starting or stopping) and listens elsewhere; pass --url with its address"
    )


def print_clients(clients: list[dict[str, Any]], offline: bool) -> None:
    print(f"{'uuid':36}  {'online':6}  {'queued':>6}  name")
    for client in clients:
        online = "-" if client["online"] is None else ("yes" if client["online"] else "no")
        print(f"{client['uuid']:36}  {online:6}  {client['queued']:>6}  {client['name']}")
    if offline:
        print("(relayd is not running: read from the store; online state unknown)", file=sys.stderr)


REDIS_BACKUP = (
    "store.engine is redis: relayd backup copies a SQLite store; back the Redis server up with"
    " its own means (an RDB snapshot, BGSAVE, or its AOF), and the store key file apart"
)


def backup(config: Config, target: Path) -> dict[str, int]:
    """Copy the store to ``target`` (which must not exist) with SQLite's online backup.

    Raises:
        AdminError: no file store (the Redis engine, or ``:memory:``), or ``target`` exists
            or cannot be written.
        StoreError: the copy failed.
    """
    if config.store.engine == "redis":
        raise AdminError(REDIS_BACKUP)
    source = config.store_path
    if source == ":memory:":
        raise AdminError("the store is :memory:; there is nothing on disk to back up")
    if not Path(source).exists():
        raise AdminError(f"no store at {source}")
    if target.exists():
        raise AdminError(f"{target} exists; relayd backup does not overwrite")
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise AdminError(f"cannot create {target}: {exc.strerror}") from None
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        dst = sqlite3.connect(target)
        try:
            src.execute("PRAGMA busy_timeout = 5000")
            src.backup(dst)
            clients = dst.execute("SELECT COUNT(*) FROM clients WHERE deleted_at IS NULL")
            queued = dst.execute("SELECT COUNT(*) FROM deliveries WHERE status IS NULL")
            return {"clients": clients.fetchone()[0], "queued_messages": queued.fetchone()[0]}
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        raise StoreError(f"backup of {source} failed: {exc}") from exc
