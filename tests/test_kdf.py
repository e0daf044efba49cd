"""Client-secret hashing: scrypt with its parameters recorded in the stored hash."""

from __future__ import annotations

import base64

import pytest

from relayd._kdf import hash_secret, new_client_secret, verify_secret

COST = 1024
SECRET = "correct horse battery staple"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_secret(SECRET, n=COST)


def _replace_field(stored: str, index: int, value: str) -> str:
    fields = stored.split("$")
    fields[index] = value
    return "$".join(fields)


def test_round_trip(stored: str) -> None:
    assert verify_secret(SECRET, stored)


def test_generated_secret_round_trip() -> None:
    secret = new_client_secret()
    assert verify_secret(secret, hash_secret(secret, n=COST))


@pytest.mark.parametrize(
    "wrong", ["", "correct horse battery stapl", "Correct horse battery staple", SECRET + " "]
)
def test_wrong_secret_is_false(stored: str, wrong: str) -> None:
    assert verify_secret(wrong, stored) is False


def test_non_ascii_secret_round_trip() -> None:
    secret = "pässwörd-\u263a"
    stored = hash_secret(secret, n=COST)
    assert verify_secret(secret, stored)
    assert not verify_secret("passwort-\u263a", stored)


def test_stored_hash_format(stored: str) -> None:
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(COST), "8", "1")
    assert len(base64.urlsafe_b64decode(salt + "==")) == 16
    assert len(base64.urlsafe_b64decode(digest + "=")) == 32
    assert SECRET not in stored


def test_different_salts_give_different_hashes() -> None:
    first = hash_secret(SECRET, n=COST)
    second = hash_secret(SECRET, n=COST)
    assert first != second
    assert first.split("$")[4] != second.split("$")[4]  # salt
    assert first.split("$")[5] != second.split("$")[5]  # digest
    assert verify_secret(SECRET, first)
    assert verify_secret(SECRET, second)


@pytest.mark.parametrize("cost", [2, 1024, 2048, 4096])
def test_cost_is_recorded_and_used(cost: int) -> None:
    stored = hash_secret(SECRET, n=cost)
    assert stored.split("$")[1] == str(cost)
    assert verify_secret(SECRET, stored)
    # The recorded cost is what verification uses: another cost gives another digest.
    other = cost * 2
    assert not verify_secret(SECRET, _replace_field(stored, 1, str(other)))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "bcrypt"),
        (0, ""),
        (1, "abc"),
        (1, ""),
        (1, "1000"),  # not a power of two
        (1, "1"),
        (1, "0"),
        (1, "-1024"),
        (1, "1.5"),
        (2, "0"),
        (2, "x"),
        (3, "0"),
        (3, "x"),
        (4, "!!!!"),
        (4, "A"),  # not valid base64 (bad length)
        (4, "\u00e9t\u00e9"),
        (5, "A"),
        (5, "\u00e9t\u00e9"),
        (5, ""),
    ],
)
def test_malformed_field_returns_false(stored: str, index: int, value: str) -> None:
    assert verify_secret(SECRET, _replace_field(stored, index, value)) is False


@pytest.mark.parametrize("index", [1, 2, 3])
def test_huge_parameter_returns_false(stored: str, index: int) -> None:
    """A cost too large for a C integer is malformed too: ``False``, not OverflowError."""
    assert verify_secret(SECRET, _replace_field(stored, index, "9" * 30)) is False


@pytest.mark.parametrize(
    "malformed",
    [
        "",
        "scrypt",
        "scrypt$1024$8$1$",
        "scrypt$1024$8$1$salt",
        "$$$$$",
        "scrypt$1024$8$1$c2FsdA$ZGlnZXN0$extra",
        "not a hash at all",
    ],
)
def test_malformed_shape_returns_false(malformed: str) -> None:
    assert verify_secret(SECRET, malformed) is False


def test_truncated_digest_is_false(stored: str) -> None:
    assert verify_secret(SECRET, stored[:-2]) is False


def test_new_client_secrets_are_long_and_distinct() -> None:
    secrets = {new_client_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(len(s) >= 43 for s in secrets)
