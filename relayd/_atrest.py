"""Message content encrypted at rest: AES-256-GCM under keys from a key file.

The store never holds a message's fields in plain text: each stored message holds
``nonce || ciphertext`` and names its key (``messages.key_id``). The message's id, sender,
address (the recipient it was sent to) and msgid are the associated data (:class:`RowId`), so
a ciphertext moved to another message, or a message pointed at another recipient, does not
decrypt; and the stores refuse to open content for a delivery whose recipient is not the
address it was sealed for. What stays readable in the database, its WAL and its backups is
what routing needs: sender, recipient, msgid, times and statuses.

The key file holds one key per line, ``<id> <base64 of 32 bytes>``; ``#`` starts a comment. The
first key encrypts new rows; the others only decrypt, so keys rotate without downtime: a new
key is added at the top (``relayd store-key rotate``), the daemon reads the file again on
SIGHUP, and an old key leaves the file (``relayd store-key retire ID``) once no row needs it.

Where the file is: ``store.key_file``; else the systemd credential ``relayd-store-keys``
(``LoadCredential=``, in ``$CREDENTIALS_DIRECTORY``); else ``state_dir/store-keys``, generated
on first start (mode 0600). A key file that is missing, unreadable, malformed, or lacks (or has
a wrong copy of) a key that rows are encrypted with stops relayd at start with an error naming
it: never silently plain text.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from attrs import frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._config import Config
from ._errors import ConfigError, StoreError

log = logging.getLogger("relayd")

KEY_FILE_NAME = "store-keys"
CREDENTIAL_NAME = "relayd-store-keys"
KEY_BYTES = 32
NONCE_BYTES = 12
AAD_VERSION = b"relayd-row-v1\0"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_HEADER = (
    "# relayd store keys (AES-256-GCM): '<id> <base64 key>' per line. The first encrypts new\n"
    "# messages; the others still decrypt. Keep this file out of the store's backups.\n"
)


class KeyFileError(ConfigError):
    """The key file is missing, unreadable or malformed; the message names it."""


class UndecryptableRow(StoreError):
    """A stored row cannot be decrypted with the keys at hand (missing or wrong key)."""


@frozen
class StoreKeys:
    """The keys of one key file: ``current`` encrypts; every key in ``keys`` decrypts."""

    current: str
    raw: Mapping[str, bytes]
    keys: Mapping[str, AESGCM]
    origin: str

    @classmethod
    def from_bytes(cls, pairs: list[tuple[str, bytes]], origin: str) -> StoreKeys:
        if not pairs:
            raise KeyFileError(f"{origin}: holds no key")
        raw = dict(pairs)
        return cls(pairs[0][0], raw, {kid: AESGCM(key) for kid, key in raw.items()}, origin)

    def merged(self, fresh: StoreKeys) -> StoreKeys:
        """``fresh`` (the key file read again) with the keys it no longer lists kept for
        decrypting: a reload may add keys and change the current one, never lose one.

        Raises:
            KeyFileError: ``fresh`` holds another key under an id already in use.
        """
        for kid, key in fresh.raw.items():
            if kid in self.raw and self.raw[kid] != key:
                raise KeyFileError(f"{fresh.origin}: key {kid!r} changed; a key id names one key")
        raw = {**fresh.raw, **{k: v for k, v in self.raw.items() if k not in fresh.raw}}
        keys = {**fresh.keys, **{k: v for k, v in self.keys.items() if k not in fresh.keys}}
        return StoreKeys(fresh.current, raw, keys, fresh.origin)

    def seal(self, row: RowId, text: str) -> tuple[str, bytes]:
        """Encrypt a row's fields under the current key; return the key id and the blob."""
        nonce = os.urandom(NONCE_BYTES)
        blob = self.keys[self.current].encrypt(nonce, text.encode("utf-8"), row.aad())
        return self.current, nonce + blob

    def open(self, row: RowId, key_id: str, blob: bytes) -> str:
        """Decrypt a row's fields.

        Raises:
            UndecryptableRow: the key is not in the file, or it is not the key that
                encrypted the row (or the row was altered).
        """
        aes = self.keys.get(key_id)
        if aes is None:
            raise UndecryptableRow(
                f"message {row.seq} is encrypted with key {key_id!r}, which {self.origin} lacks"
            )
        try:
            text = aes.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], row.aad())
        except (InvalidTag, ValueError):
            raise UndecryptableRow(
                f"message {row.seq} does not decrypt with key {key_id!r} from {self.origin}: a"
                " wrong key under that id, or an altered row"
            ) from None
        return text.decode("utf-8")


@frozen
class RowId:
    """What a sealed message is bound to (the associated data): its id (the seq of its first
    delivery), sender, address (``recipient``: whom it was sent to) and msgid. A ciphertext
    copied to another message, or a message pointed at another recipient, does not
    decrypt."""

    seq: int
    sender: str
    recipient: str
    msgid: str

    def aad(self) -> bytes:
        parts = [AAD_VERSION, self.seq.to_bytes(8, "big", signed=True)]
        for text in (self.sender, self.recipient, self.msgid):
            data = text.encode("utf-8")
            parts += [len(data).to_bytes(4, "big"), data]  # length-prefixed: unambiguous
        return b"".join(parts)


def new_key_id() -> str:
    return secrets.token_hex(4)


def parse_key_file(text: str, origin: str) -> list[tuple[str, bytes]]:
    """The ``(id, key)`` pairs of a key file, in order.

    Raises:
        KeyFileError: a line is malformed, a key is not 32 bytes, or an id repeats.
    """
    pairs: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{origin}, line {number}"
        if len(parts) != 2 or not _KEY_ID.match(parts[0]):
            raise KeyFileError(f"{where}: expected '<id> <base64 key>' (id: letters, digits, _-)")
        try:
            key = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where}: the key is not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"{where}: the key is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        if any(kid == parts[0] for kid, _ in pairs):
            raise KeyFileError(f"{where}: key id {parts[0]!r} appears twice")
        pairs.append((parts[0], key))
    if not pairs:
        raise KeyFileError(f"{origin}: holds no key")
    return pairs


def render_key_file(pairs: list[tuple[str, bytes]]) -> str:
    lines = [f"{kid} {base64.b64encode(key).decode('ascii')}" for kid, key in pairs]
    return _HEADER + "\n".join(lines) + "\n"


def write_key_file(path: Path, pairs: list[tuple[str, bytes]], *, new: bool = False) -> None:
    """Replace ``path`` atomically with ``pairs`` (mode 0600, fsynced, and its directory),
    keeping its owner: run as root, the command must not take the file from the user relayd
    runs as. ``new``: create it, or raise ``FileExistsError`` if it exists (never a file half
    written, whatever crash comes)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    owner = path.stat() if path.exists() and not new else None
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None and os.geteuid() == 0:  # only root may give a file away
            os.fchown(fd, owner.st_uid, owner.st_gid)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(render_key_file(pairs))
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            os.link(temporary, path)  # fails if it exists
            temporary.unlink()
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def key_file_path(config: Config, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """Where the key file is, and whether relayd may generate it there (the default place
    only: a configured file or a credential that is missing is an error)."""
    if config.store.key_file:
        return Path(config.store.key_file), False
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).exists():
        return Path(credentials) / CREDENTIAL_NAME, False
    return config.state_path / KEY_FILE_NAME, True


def load_store_keys(
    config: Config, environ: Mapping[str, str], *, generate: bool = True
) -> StoreKeys:
    """Read the key file (see the module's docstring), generating it in ``state_dir`` on the
    first start if no other is configured.

    Raises:
        KeyFileError: missing (where it may not be generated), unreadable or malformed.
    """
    path, may_generate = key_file_path(config, environ)
    if not path.exists() and may_generate and generate:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made meanwhile: read it
            write_key_file(path, [(new_key_id(), AESGCM.generate_key(256))], new=True)
    try:
        text = path.read_text(encoding="ascii")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no store key file (store.key_file); relayd generates one only in"
            " state_dir, and only when no other is configured"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the store key file: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("store key file %s is readable by other users; chmod 600 it", path)
    return StoreKeys.from_bytes(parse_key_file(text, str(path)), str(path))
