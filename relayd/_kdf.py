"""Client secrets: generated, shown once, stored only as a scrypt hash.

A stored hash reads ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64url salt and hash), so raising
the cost later does not invalidate existing secrets. Hashing takes tens of milliseconds on
purpose: callers run it in a worker thread (see ``AuthService``), never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_R = 8
_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_client_secret() -> str:
    """A fresh client secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=2 * 128 * r * n + 1024 * 1024,
        dklen=_HASH_BYTES,
    )


def hash_secret(secret: str, *, n: int) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(secret, salt, n, _R, _P)
    return f"scrypt${n}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Compare ``secret`` with a stored hash in constant time; ``False`` for any malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = _scrypt(secret, _unb64(salt), int(n), int(r), int(p))
    except (ValueError, TypeError, OverflowError):
        return False
    return hmac.compare_digest(actual, expected)
