"""A client's credentials, and where they are kept.

:class:`Credentials` holds an identity (relayd's URL, the client's uuid, name and secret) and
its current tokens. A store keeps them: :class:`CredentialFile` in a JSON file, or
:class:`MemoryCredentials` for a program that keeps them itself.

The file's rules:

1. It is readable by its owner only: created 0600 in a directory created 0700, and a file that
   others can read is refused (as ssh refuses such a key), since it holds the secret.
2. Every write is atomic: a new file beside it (0600, flushed and fsynced), renamed over it,
   and the directory fsynced. A crash leaves the old file or the new one, never half of one.
3. One client at a time: the client holds an exclusive ``flock`` on ``<file>.lock`` while it
   runs. Two clients on one identity would replace each other's session (close 4009) and,
   worse, could each present the same refresh token, which relayd takes for theft and answers
   by revoking the whole login.
4. A refresh token is marked ``refresh_in_flight`` in the file before it is sent to relayd, and
   the new pair is written before it is used: after a crash in between, the next run logs in
   with the secret rather than present a token relayd may already have spent.

Tokens and the secret never appear in a ``repr`` or a log line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any, Protocol

import anyio
import attrs
from attrs import field, frozen

from ._errors import CredentialsError, CredentialsInUse

FILE_VERSION = 1


@frozen
class TokenPair:
    """Tokens as relayd issued them; expiries on this machine's clock (now + ``expires_in``),
    so that a skewed clock between client and relayd does not matter."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: float
    access_issued_at: float
    refresh_expires_at: float


@frozen
class Credentials:
    """An identity and its tokens.

    >>> c = Credentials(url="http://127.0.0.1:8000", uuid="8cb0dec9-9342-4eba-89f7-28f97513c0c5",
    ...                 name="alice", client_secret="s3cret")
    >>> "s3cret" in repr(c)
    False
    """

    url: str
    uuid: str
    name: str
    client_secret: str = field(repr=False)
    tokens: TokenPair | None = None
    refresh_in_flight: bool = False

    def with_tokens(self, tokens: TokenPair | None) -> Credentials:
        return attrs.evolve(self, tokens=tokens, refresh_in_flight=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": FILE_VERSION,
            "url": self.url,
            "uuid": self.uuid,
            "name": self.name,
            "client_secret": self.client_secret,
            "refresh_in_flight": self.refresh_in_flight,
        }
        if self.tokens is not None:
            doc["tokens"] = attrs.asdict(self.tokens)
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Credentials:
        """Raises :class:`CredentialsError` naming ``where`` and the bad key."""
        if not isinstance(doc, dict):
            raise CredentialsError(f"{where}: not a JSON object")
        try:
            tokens = doc.get("tokens")
            return cls(
                url=_text(doc, "url"),
                uuid=_text(doc, "uuid"),
                name=_text(doc, "name"),
                client_secret=_text(doc, "client_secret"),
                tokens=None if tokens is None else TokenPair(**tokens),
                refresh_in_flight=doc.get("refresh_in_flight") is True,
            )
        except (KeyError, TypeError) as exc:
            raise CredentialsError(f"{where}: malformed credentials ({exc})") from None


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} must be a non-empty string")
    return value


def write_private_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` by the file rules above: 0600 in a 0700 directory, atomic
    (a file beside it, fsynced, renamed over it, the directory fsynced)."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps(doc, indent=2).encode() + b"\n"
    temporary = directory / f".{path.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by a crash of a process that had our pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_private_json(path: Path) -> Any:
    """The JSON in ``path``, refusing a file others can read.

    Raises:
        FileNotFoundError: no such file.
        CredentialsError: unreadable, readable by others, or not JSON.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CredentialsError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError(
                f"{path}: readable by others (mode {stat.S_IMODE(mode):04o}); it holds"
                f" a secret: chmod 600 it"
            )
        try:
            return json.loads(fh.read())
        except ValueError:
            raise CredentialsError(f"{path}: not JSON") from None


def default_directory() -> Path:
    """Where identities are kept: ``$XDG_CONFIG_HOME/relayd/clients``, or
    ``~/.config/relayd/clients``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "relayd" / "clients"


class CredentialStore(Protocol):
    """Where a client's credentials live. ``save`` must be durable when it returns: the
    client relies on it before using a new refresh token."""

    async def load(self) -> Credentials: ...

    async def save(self, credentials: Credentials) -> None: ...

    async def acquire(self) -> None:
        """Take exclusive use of these credentials, or raise :class:`CredentialsInUse`."""

    async def release(self) -> None: ...


class MemoryCredentials:
    """Credentials kept in memory: for tests, and for programs that keep them elsewhere
    (read :attr:`credentials` after the client has run to persist the newest tokens)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._held = False

    async def load(self) -> Credentials:
        return self.credentials

    async def save(self, credentials: Credentials) -> None:
        self.credentials = credentials

    async def acquire(self) -> None:
        if self._held:
            raise CredentialsInUse(f"credentials of {self.credentials.name} are in use")
        self._held = True

    async def release(self) -> None:
        self._held = False


class CredentialFile:
    """Credentials in a JSON file, readable by its owner only (see the module's rules).

    >>> store = CredentialFile("~/.config/relayd/clients/alice.json")
    >>> store.path.name
    'alice.json'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock_fd: int | None = None

    @classmethod
    def named(cls, name: str, directory: str | os.PathLike[str] | None = None) -> CredentialFile:
        """The identity ``name`` where ``relayd register NAME`` keeps it:
        ``<directory>/<name>.json``, by default in :func:`default_directory`.

        >>> CredentialFile.named("alice", "/tmp/ids").path
        PosixPath('/tmp/ids/alice.json')

        Raises:
            CredentialsError: ``name`` is not a plain file name.
        """
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise CredentialsError(f"{name!r} is not a usable identity name")
        base = Path(directory) if directory is not None else default_directory()
        return cls(base / f"{name}.json")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def exists(self) -> bool:
        return self.path.exists()

    async def load(self) -> Credentials:
        return await anyio.to_thread.run_sync(self.load_sync)

    async def save(self, credentials: Credentials) -> None:
        await anyio.to_thread.run_sync(self.save_sync, credentials)

    async def acquire(self) -> None:
        await anyio.to_thread.run_sync(self.acquire_sync)

    async def release(self) -> None:
        self.release_sync()

    def load_sync(self) -> Credentials:
        try:
            doc = read_private_json(self.path)
        except FileNotFoundError:
            raise CredentialsError(
                f"{self.path}: no credentials (register the client first)"
            ) from None
        return Credentials.from_json(doc, str(self.path))

    def save_sync(self, credentials: Credentials) -> None:
        write_private_json(self.path, credentials.to_json())

    def acquire_sync(self) -> None:
        if self._lock_fd is not None:
            raise CredentialsInUse(f"{self.path}: already in use by this client")
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CredentialsInUse(
                f"{self.path}: in use by another client (one identity, one session at a time;"
                " register another client for a second program)"
            ) from None
        self._lock_fd = fd

    def release_sync(self) -> None:
        if self._lock_fd is not None:
            # Closing the last descriptor releases the flock.
            os.close(self._lock_fd)
            self._lock_fd = None
