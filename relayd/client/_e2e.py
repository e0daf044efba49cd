"""End-to-end encryption for relayd clients: sealed boxes to keys from relayd's directory.

Optional: it needs PyNaCl (``pip install 'relayd[e2e]'``), imported only when a key is made or
used, so the rest of the SDK works without it (:class:`E2EUnavailable` names the extra).

Theory of operation:

* **Keys.** A client's X25519 key pair lives in a file beside its credentials
  (``alice.json`` → ``alice.e2e.json``), under the same rules: 0600 in a 0700 directory,
  written atomically. :meth:`EndToEnd.publish` makes the pair on first use and publishes its
  public half in the directory (``PUT /clients/{uuid}/keys``). A rotated key's private half is
  kept (the newest :data:`MAX_OLD_KEYS`) so that messages sealed to it still open.
* **Encryption.** A message for a peer is sealed (libsodium's ``crypto_box_seal``: an
  ephemeral X25519 key, XSalsa20-Poly1305) to the peer's current X25519 key from the
  directory. Only the peer's private key opens it; relayd stores and forwards opaque text.
  A sealed box does not say who sealed it: the sender is who relayd says (``from`` is the
  authenticated sender), so relayd itself could forge one. This protects content from relayd
  and its store, not the sender's identity from relayd.
* **Marking.** The sealed message travels in ``content`` as text, so it fits the seed
  system's 13-field envelope unchanged: ``relayd-e2e.v1:sealedbox:<fingerprint>:<base64>``
  where ``<fingerprint>`` is the SHA-256 (hex) of the recipient's key it was sealed to, and
  ``<base64>`` the sealed box (standard base64). Any other ``content`` is plain text. A seed
  client sees an opaque string.
* **Pinning.** The first fingerprint seen for a peer is pinned in the key file (trust on first
  use). When the directory later shows another key, :class:`KeyMismatch` is raised before
  anything is sealed to it, until :meth:`EndToEnd.trust` pins the new fingerprint (after
  checking it with the peer by another channel). A ``key_changed`` frame for a peer is recorded
  in :attr:`EndToEnd.key_changes` (and passed to ``Client(on_key_changed=...)``), and drops
  the cached key, so the next message re-reads the directory and meets the mismatch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
from attrs import field, frozen

from ._client import Client, SendHandle
from ._credentials import CredentialFile, read_private_json, write_private_json
from ._errors import ClientError, CredentialsError
from ._frames import KeyChange, Message

ALGORITHM = "x25519"
MARK = "relayd-e2e.v1"
SCHEME = "sealedbox"
FILE_VERSION = 1
# Private keys kept after a rotation, to open messages sealed to them while in flight.
MAX_OLD_KEYS = 4
# Key changes remembered for the application (the newest).
MAX_KEY_CHANGES = 256
E2E_HINT = "pip install 'relayd[e2e]'"


class E2EError(ClientError):
    """Root of the end-to-end helper's errors."""


class E2EUnavailable(E2EError):
    """PyNaCl is not installed: install the ``e2e`` extra."""


class NoPeerKey(E2EError):
    """The peer has published no X25519 key: nothing to seal to."""


class KeyMismatch(E2EError):
    """The directory shows a key for ``peer`` other than the pinned one. Check the new
    ``current`` fingerprint with the peer by another channel, then :meth:`EndToEnd.trust` it."""

    def __init__(self, peer: str, pinned: str, current: str) -> None:
        super().__init__(
            f"the key of {peer} changed: pinned {pinned}, the directory shows {current};"
            " verify it with the peer, then trust it"
        )
        self.peer = peer
        self.pinned = pinned
        self.current = current


class DecryptError(E2EError):
    """An encrypted message that cannot be opened: not sealed to any key of this client,
    tampered with, or malformed."""


def _nacl() -> ModuleType:
    try:
        import nacl.public
    except ImportError:
        raise E2EUnavailable(f"end-to-end encryption needs PyNaCl: {E2E_HINT}") from None
    return nacl.public


def fingerprint(key: bytes) -> str:
    """SHA-256 of the key bytes, lowercase hex: what relayd's directory shows."""
    return hashlib.sha256(key).hexdigest()


def is_encrypted(content: str) -> bool:
    """Whether ``content`` carries the end-to-end marking."""
    return content.startswith(f"{MARK}:")


@frozen
class KeyPair:
    private: bytes
    public: bytes
    created_at: float

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


@frozen
class PeerKey:
    """A peer's current X25519 key, and whether it was just pinned (first use)."""

    uuid: str
    key: bytes
    fingerprint: str
    newly_pinned: bool


@frozen
class KeyState:
    """What the key file holds: own key pairs (newest first) and pinned peer fingerprints."""

    keys: tuple[KeyPair, ...] = ()
    pins: dict[str, str] = field(factory=dict)  # peer uuid -> fingerprint; replaced, not changed

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FILE_VERSION,
            "keys": [
                {
                    "algorithm": ALGORITHM,
                    "private": base64.b64encode(k.private).decode("ascii"),
                    "public": base64.b64encode(k.public).decode("ascii"),
                    "created_at": k.created_at,
                }
                for k in self.keys
            ],
            "pins": dict(self.pins),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> KeyState:
        """Raises :class:`CredentialsError` naming ``where``."""
        try:
            if doc["version"] != FILE_VERSION:
                raise ValueError(f"version {doc['version']!r}")
            keys = tuple(
                KeyPair(
                    base64.b64decode(k["private"], validate=True),
                    base64.b64decode(k["public"], validate=True),
                    float(k["created_at"]),
                )
                for k in doc["keys"]
            )
            pins = {str(peer): str(fp) for peer, fp in doc["pins"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise CredentialsError(f"{where}: malformed key file ({exc!r})") from None
        return cls(keys, pins)


class KeyFile:
    """A client's end-to-end keys and pins in a JSON file (0600, atomic writes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    @classmethod
    def beside(cls, credentials: CredentialFile) -> KeyFile:
        """The key file next to a credentials file: ``alice.json`` → ``alice.e2e.json``."""
        path = credentials.path
        return cls(path.with_name(f"{path.stem}.e2e.json"))

    def exists(self) -> bool:
        return self.path.exists()

    async def load(self) -> KeyState:
        return await anyio.to_thread.run_sync(self._load_sync)

    async def save(self, state: KeyState) -> None:
        await anyio.to_thread.run_sync(write_private_json, self.path, state.to_json())

    def _load_sync(self) -> KeyState:
        try:
            doc = read_private_json(self.path)
        except FileNotFoundError:
            return KeyState()
        return KeyState.from_json(doc, str(self.path))


def _sealed_parts(content: str) -> tuple[str, bytes]:
    """The recipient fingerprint and the sealed box of a marked ``content``."""
    parts = content.split(":")
    if len(parts) != 4 or parts[0] != MARK or parts[1] != SCHEME:
        raise DecryptError("not a relayd-e2e.v1 sealed box")
    try:
        return parts[2], base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        raise DecryptError("the sealed box is not base64") from None


class EndToEnd:
    """End-to-end encryption for one client (see the module docstring)::

    store = CredentialFile.named("alice")
    async with Client(store) as client:
        e2e = EndToEnd(client, KeyFile.beside(store))
        print(await e2e.publish())                 # own fingerprint, to tell peers
        await e2e.send(bob, "only bob reads this")
        async for message in client.messages():
            if e2e.is_encrypted(message):
                print(await e2e.decrypt(message))
    """

    @staticmethod
    def is_encrypted(message: Message) -> bool:
        """Whether ``message`` carries end-to-end encrypted content."""
        return is_encrypted(message.content)

    def __init__(self, client: Client, keys: KeyFile) -> None:
        self._client = client
        self._file = keys
        self._state: KeyState | None = None
        self._cache: dict[str, PeerKey] = {}
        self._lock = anyio.Lock()
        self.key_changes: list[KeyChange] = []
        """``key_changed`` frames received, oldest first (the newest MAX_KEY_CHANGES)."""
        client._listen_key_changes(self._on_key_change)

    def _on_key_change(self, change: KeyChange) -> None:
        self._cache.pop(change.client, None)
        self.key_changes.append(change)
        del self.key_changes[:-MAX_KEY_CHANGES]

    async def _load(self) -> KeyState:
        if self._state is None:
            self._state = await self._file.load()
        return self._state

    async def _save(self, state: KeyState) -> None:
        await self._file.save(state)
        self._state = state

    # --- own keys ------------------------------------------------------------------------------

    async def publish(self, *, rotate: bool = False) -> str:
        """Make this client's key pair if it has none (or a new one, ``rotate``), publish its
        public half in the directory, and return its fingerprint. The new pair is saved before
        it is published: a crash in between leaves a key that is published next time.

        Raises:
            E2EUnavailable: PyNaCl is not installed.
            HttpError: relayd refused it.
        """
        public = _nacl()
        async with self._lock:
            state = await self._load()
            if rotate or not state.keys:
                private = public.PrivateKey.generate()
                pair = KeyPair(bytes(private), bytes(private.public_key), time.time())
                keys = (pair, *state.keys)[: MAX_OLD_KEYS + 1]
                state = KeyState(keys, state.pins)
                await self._save(state)
            current = state.keys[0]
        await self._client.publish_keys({ALGORITHM: current.public})
        return current.fingerprint

    async def own_fingerprint(self) -> str | None:
        """The fingerprint of this client's current key, if it has one."""
        state = await self._load()
        return state.keys[0].fingerprint if state.keys else None

    # --- peers ---------------------------------------------------------------------------------

    async def peer_key(self, peer: str) -> PeerKey:
        """``peer``'s current X25519 key from the directory, checked against its pin (a first
        key is pinned).

        Raises:
            NoPeerKey: it has published none.
            KeyMismatch: the directory shows another key than the pinned one.
        """
        uuid = await self._client.resolve(peer)
        cached = self._cache.get(uuid)
        if cached is not None:
            return cached
        keys = await self._client.peer_keys(uuid)
        current = keys.get(ALGORITHM)
        if current is None:
            raise NoPeerKey(f"{peer} has published no {ALGORITHM} key: it cannot be sent to")
        async with self._lock:
            state = await self._load()
            pinned = state.pins.get(uuid)
            if pinned is not None and pinned != current.fingerprint:
                raise KeyMismatch(uuid, pinned, current.fingerprint)
            if pinned is None:
                await self._save(KeyState(state.keys, {**state.pins, uuid: current.fingerprint}))
        found = PeerKey(uuid, current.key, current.fingerprint, newly_pinned=pinned is None)
        self._cache[uuid] = found
        return found

    async def pinned(self, peer: str) -> str | None:
        """The fingerprint pinned for ``peer``, if any."""
        uuid = await self._client.resolve(peer)
        return (await self._load()).pins.get(uuid)

    async def trust(self, peer: str, expected: str) -> None:
        """Pin ``peer``'s current key, whose fingerprint must be ``expected`` (as checked with
        the peer by another channel).

        Raises:
            KeyMismatch: the directory's current key is not ``expected``.
            NoPeerKey: it has published none.
        """
        uuid = await self._client.resolve(peer)
        current = (await self._client.peer_keys(uuid)).get(ALGORITHM)
        if current is None:
            raise NoPeerKey(f"{peer} has published no {ALGORITHM} key")
        if current.fingerprint != expected.lower():
            raise KeyMismatch(uuid, expected.lower(), current.fingerprint)
        async with self._lock:
            state = await self._load()
            await self._save(KeyState(state.keys, {**state.pins, uuid: current.fingerprint}))
        self._cache.pop(uuid, None)

    # --- sealing and opening -------------------------------------------------------------------

    async def encrypt(self, peer: str, text: str) -> str:
        """``text`` sealed to ``peer``'s key, marked, as ``content`` for a message to it.

        Raises:
            E2EUnavailable, NoPeerKey, KeyMismatch: see :meth:`peer_key`.
        """
        public = _nacl()
        key = await self.peer_key(peer)
        sealed = public.SealedBox(public.PublicKey(key.key)).encrypt(text.encode("utf-8"))
        encoded = base64.b64encode(bytes(sealed)).decode("ascii")
        return f"{MARK}:{SCHEME}:{key.fingerprint}:{encoded}"

    async def send(self, peer: str, text: str, **options: Any) -> SendHandle:
        """:meth:`Client.send` of ``text`` sealed to ``peer`` (``options`` as there)."""
        uuid = await self._client.resolve(peer)
        return await self._client.send(uuid, await self.encrypt(uuid, text), **options)

    async def decrypt(self, message: Message | str) -> str:
        """The plain text of an encrypted message (or ``content``).

        Raises:
            E2EUnavailable: PyNaCl is not installed.
            DecryptError: not marked, not sealed to a key of this client, or tampered with.
        """
        content = message.content if isinstance(message, Message) else message
        recipient, sealed = _sealed_parts(content)
        public = _nacl()
        from nacl.exceptions import CryptoError

        state = await self._load()
        pair = next((k for k in state.keys if k.fingerprint == recipient), None)
        if pair is None:
            raise DecryptError(f"sealed to key {recipient}, which this client does not hold")
        try:
            plain: bytes = public.SealedBox(public.PrivateKey(pair.private)).decrypt(sealed)
            return plain.decode("utf-8")
        except (CryptoError, UnicodeDecodeError):
            raise DecryptError("the sealed box does not open: tampered with, or corrupt") from None
