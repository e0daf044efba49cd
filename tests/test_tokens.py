"""TokenCodec: issue/verify round trips, every way a token must be refused, and exact times.

Attack tokens are built by hand (base64url header and payload, HMAC-SHA256 signature) so that
nothing in PyJWT's encoder can quietly "fix" them. A control test checks that the hand-built
token is accepted when nothing is wrong with it, so each refusal below is due to the one
thing the test changed.

Times: the codec's clock is ``EPOCH + trio.current_time()`` under ``autojump_clock``, so
``await trio.sleep(...)`` moves the codec's wall clock by exactly that much.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from relayd._errors import TokenError
from relayd._tokens import REQUIRED_CLAIMS, TokenCodec, TokenUse

from .support import TEST_SECRET

EPOCH = 1_700_000_000.0
SECRET = TEST_SECRET.encode()
OTHER_SECRET = b"another-signing-secret-of-at-least-32-bytes!"
ISSUER = "relayd-test-issuer"
AUDIENCE = "relayd-test-audience"
LEEWAY = 5.0
TTL = 900.0
SUB = "6f1c1f3e-8f0a-4f55-9d43-0c7d5c1f2b7a"
# What an RSA public key looks like to someone who would use it as an HMAC secret.
PUBLIC_KEY_PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n"
    b"4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n"
    b"+qKhbwKfBstIs+bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyeh\n"
    b"kd3qqGElvW/VDL5AaWTg0nLVkjRo9z+40RQzuVaE8AkAFmxZzow3x+VJYKdjykkJ\n"
    b"0iT9wCS0DRTXu269V264Vf/3jvredZiKRkgwlL9xNAwxXFg0x/XFw005UWVRIkdg\n"
    b"cKWTjpBP2dPwVZ4WWC+9aGVd+Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbc\n"
    b"mwIDAQAB\n"
    b"-----END PUBLIC KEY-----\n"
)


def virtual_clock() -> float:
    return EPOCH + trio.current_time()


def fixed_clock() -> float:
    return EPOCH


def make_codec(
    *,
    secret: bytes = SECRET,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    clock: Callable[[], float] = fixed_clock,
) -> TokenCodec:
    return TokenCodec(secret, issuer=issuer, audience=audience, leeway=LEEWAY, clock=clock)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def segment(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def hs256(signing_input: str, key: bytes) -> str:
    return b64url(hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest())


def forge(payload: Any, *, key: bytes | None = SECRET, header: Any = None) -> str:
    """A compact JWS built by hand; ``key=None`` leaves the signature empty."""
    if header is None:
        header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = "" if key is None else hs256(signing_input, key)
    return f"{signing_input}.{signature}"


def claims_at(now: float, **changes: Any) -> dict[str, Any]:
    """A complete, valid access-token payload issued at ``now``."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUB,
        "jti": "jti-0123456789",
        "iat": now,
        "nbf": now,
        "exp": now + TTL,
        "roles": ["client"],
        "token_use": "access",
    }
    payload.update(changes)
    return payload


def refused(codec: TokenCodec, token: str, *, use: TokenUse = "access") -> str:
    """Verify ``token``, which must be refused; return the TokenError code."""
    with pytest.raises(TokenError) as exc_info:
        codec.verify(token, use=use)
    assert exc_info.value.status == 401
    assert exc_info.value.headers == {"WWW-Authenticate": "Bearer"}
    return exc_info.value.code


# --- round trips and controls ------------------------------------------------------------------


def test_access_token_round_trip() -> None:
    codec = make_codec()
    issued = codec.issue(sub=SUB, token_use="access", roles=("client", "admin"), ttl=TTL)
    claims = codec.verify(issued.token, use="access")
    assert claims == issued.claims
    assert claims.sub == SUB
    assert claims.iat == claims.nbf == EPOCH
    assert claims.exp == EPOCH + TTL
    assert claims.roles == ("client", "admin")
    assert claims.token_use == "access"
    assert claims.family is None
    assert claims.is_admin
    assert not claims.is_operator


def test_refresh_token_round_trip_carries_family() -> None:
    codec = make_codec()
    issued = codec.issue(sub=SUB, token_use="refresh", roles=("client",), ttl=TTL, family="fam1")
    claims = codec.verify(issued.token, use="refresh")
    assert claims.family == "fam1"
    assert claims.token_use == "refresh"
    assert not claims.is_admin


def test_each_token_gets_a_fresh_jti() -> None:
    codec = make_codec()
    first = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL)
    second = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL)
    assert first.claims.jti != second.claims.jti
    assert first.token != second.token


def test_hand_forged_token_with_the_right_secret_is_accepted() -> None:
    """Control: the forging helpers make tokens the codec accepts when nothing is wrong."""
    claims = make_codec().verify(forge(claims_at(EPOCH)), use="access")
    assert claims.sub == SUB
    assert claims.jti == "jti-0123456789"


def test_operator_subject_is_operator() -> None:
    codec = make_codec()
    issued = codec.issue(sub="operator:ops", token_use="access", roles=("admin",), ttl=TTL)
    assert codec.verify(issued.token, use="access").is_operator


@pytest.mark.parametrize("length", [0, 16, 31])
def test_short_secret_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        make_codec(secret=b"k" * length)


def test_32_byte_secret_is_enough() -> None:
    codec = make_codec(secret=b"k" * 32)
    issued = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL)
    assert codec.verify(issued.token, use="access").sub == SUB


# --- signatures and algorithms -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = forge(claims_at(EPOCH), key=None, header={"alg": alg, "typ": "JWT"})
    assert token.endswith(".")
    assert refused(make_codec(), token) == "token_invalid"


def test_alg_none_with_a_signature_is_refused() -> None:
    token = forge(claims_at(EPOCH), key=SECRET, header={"alg": "none", "typ": "JWT"})
    assert refused(make_codec(), token) == "token_invalid"


def test_token_signed_with_another_key_is_refused() -> None:
    stranger = make_codec(secret=OTHER_SECRET)
    token = stranger.issue(sub=SUB, token_use="access", roles=("client",), ttl=TTL).token
    assert stranger.verify(token, use="access").sub == SUB
    assert refused(make_codec(), token) == "token_invalid"


def test_hand_signed_token_with_another_key_is_refused() -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH), key=OTHER_SECRET)) == "token_invalid"


@pytest.mark.parametrize(
    "changes",
    [
        {"roles": ["client", "admin"]},
        {"sub": "operator:root"},
        {"exp": EPOCH + 10 * TTL},
        {"token_use": "refresh", "fam": "stolen"},
    ],
    ids=["roles", "sub", "exp", "token_use"],
)
def test_tampered_payload_is_refused(changes: dict[str, Any]) -> None:
    codec = make_codec()
    token = codec.issue(sub=SUB, token_use="access", roles=("client",), ttl=TTL).token
    header, payload, signature = token.split(".")
    claims = json.loads(unb64url(payload))
    claims.update(changes)
    tampered = f"{header}.{segment(claims)}.{signature}"
    assert tampered != token
    assert refused(codec, tampered) == "token_invalid"
    assert refused(codec, tampered, use="refresh") == "token_invalid"


def test_truncated_signature_is_refused() -> None:
    codec = make_codec()
    token = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL).token
    assert refused(codec, token[:-4]) == "token_invalid"


def test_hs256_signed_with_a_public_key_looking_secret_is_refused() -> None:
    """Key confusion: an attacker uses a (public) PEM key as the HMAC secret."""
    token = forge(claims_at(EPOCH), key=PUBLIC_KEY_PEM)
    assert refused(make_codec(), token) == "token_invalid"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA", "HS384", "HS512"])
@pytest.mark.parametrize("key", [SECRET, PUBLIC_KEY_PEM], ids=["server-secret", "public-key"])
def test_other_declared_algorithm_with_hmac_signature_is_refused(alg: str, key: bytes) -> None:
    """Key confusion: the header declares another algorithm over an HMAC-SHA256 signature."""
    token = forge(claims_at(EPOCH), key=key, header={"alg": alg, "typ": "JWT"})
    assert refused(make_codec(), token) == "token_invalid"


def test_codec_refuses_an_asymmetric_key_as_its_secret() -> None:
    """A PEM key is long enough, but PyJWT refuses it as an HMAC secret on every call.

    The codec should refuse it up front (as it refuses a short secret) instead of raising
    ``jwt.InvalidKeyError`` from every ``issue`` and ``verify``.
    """
    with pytest.raises(ValueError, match="secret"):
        make_codec(secret=PUBLIC_KEY_PEM)


# --- malformed tokens and claims --------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "...",
        "\u00fc.\u00fc.\u00fc",
        "eyJhbGciOiJIUzI1NiJ9..",
        f"{b64url(b'not json')}.{segment({'sub': SUB})}.AAAA",
        "Bearer " + forge(claims_at(EPOCH)),
        forge(claims_at(EPOCH)) + "x",
        forge([claims_at(EPOCH)]),
        forge("a string payload"),
        forge(42),
        forge(claims_at(EPOCH), header=["HS256"]),
    ],
)
def test_garbage_is_refused(token: str) -> None:
    assert refused(make_codec(), token) == "token_invalid"


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_missing_claim_is_refused(claim: str) -> None:
    payload = claims_at(EPOCH)
    del payload[claim]
    with pytest.raises(TokenError) as exc_info:
        make_codec().verify(forge(payload), use="access")
    assert exc_info.value.code == "token_invalid"
    assert repr(claim) in exc_info.value.message


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_null_claim_is_refused(claim: str) -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH, **{claim: None}))) == "token_invalid"


def test_refresh_token_without_family_is_refused() -> None:
    token = forge(claims_at(EPOCH, token_use="refresh"))
    assert refused(make_codec(), token, use="refresh") == "token_invalid"


def test_wrong_audience_is_refused() -> None:
    token = make_codec(audience="someone-else").issue(sub=SUB, token_use="access", roles=(), ttl=1)
    assert refused(make_codec(), token.token) == "token_invalid"


def test_audience_list_without_ours_is_refused() -> None:
    token = forge(claims_at(EPOCH, aud=["someone-else", "another"]))
    assert refused(make_codec(), token) == "token_invalid"


def test_wrong_issuer_is_refused() -> None:
    token = make_codec(issuer="evil").issue(sub=SUB, token_use="access", roles=(), ttl=1)
    assert refused(make_codec(), token.token) == "token_invalid"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1700000900", True, False, [EPOCH], {"t": EPOCH}])
def test_non_number_time_claim_is_refused(claim: str, value: Any) -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH, **{claim: value}))) == "token_invalid"


@pytest.mark.parametrize(
    "roles", ["admin", "client admin", {"admin": True}, [1], ["client", None], 7, True]
)
def test_roles_not_a_list_of_strings_is_refused(roles: Any) -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH, roles=roles))) == "token_invalid"


@pytest.mark.parametrize("token_use", ["id", "ACCESS", "", 1, ["access"]])
def test_unknown_token_use_is_refused(token_use: Any) -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH, token_use=token_use))) == "token_invalid"


@pytest.mark.parametrize("claim", ["sub", "jti"])
@pytest.mark.parametrize("value", ["", 42, ["x"]])
def test_bad_string_claim_is_refused(claim: str, value: Any) -> None:
    assert refused(make_codec(), forge(claims_at(EPOCH, **{claim: value}))) == "token_invalid"


@pytest.mark.parametrize("family", [1, ["f"], {"f": 1}, True])
def test_non_string_family_is_refused(family: Any) -> None:
    token = forge(claims_at(EPOCH, token_use="refresh", fam=family))
    assert refused(make_codec(), token, use="refresh") == "token_invalid"


# --- token types ----------------------------------------------------------------------------


def test_refresh_token_used_as_access_token_is_refused() -> None:
    codec = make_codec()
    token = codec.issue(sub=SUB, token_use="refresh", roles=("client",), ttl=TTL, family="f")
    assert refused(codec, token.token, use="access") == "token_wrong_type"


def test_access_token_used_as_refresh_token_is_refused() -> None:
    codec = make_codec()
    token = codec.issue(sub=SUB, token_use="access", roles=("client",), ttl=TTL)
    assert refused(codec, token.token, use="refresh") == "token_wrong_type"


def test_access_token_with_a_family_is_still_not_a_refresh_token() -> None:
    codec = make_codec()
    token = codec.issue(sub=SUB, token_use="access", roles=("client",), ttl=TTL, family="f")
    assert refused(codec, token.token, use="refresh") == "token_wrong_type"


# --- times, under a virtual clock ------------------------------------------------------------


async def test_expiry_boundary_is_exp_plus_leeway(autojump_clock: trio.testing.MockClock) -> None:
    codec = make_codec(clock=virtual_clock)
    start = trio.current_time()
    issued = codec.issue(sub=SUB, token_use="access", roles=("client",), ttl=TTL)
    assert issued.claims.exp == issued.claims.iat + TTL

    await trio.sleep(TTL)
    assert codec.verify(issued.token, use="access").jti == issued.claims.jti
    await trio.sleep(LEEWAY)
    assert trio.current_time() - start == TTL + LEEWAY  # t = 905: still valid
    assert codec.verify(issued.token, use="access").jti == issued.claims.jti
    await trio.sleep(0.01)
    assert trio.current_time() - start == pytest.approx(TTL + LEEWAY + 0.01)
    assert refused(codec, issued.token) == "token_expired"


async def test_expired_refresh_token_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    codec = make_codec(clock=virtual_clock)
    issued = codec.issue(sub=SUB, token_use="refresh", roles=(), ttl=60.0, family="f")
    await trio.sleep(60.0 + LEEWAY)
    assert codec.verify(issued.token, use="refresh").family == "f"
    await trio.sleep(0.01)
    assert refused(codec, issued.token, use="refresh") == "token_expired"


async def test_expired_is_reported_before_wrong_type(
    autojump_clock: trio.testing.MockClock,
) -> None:
    codec = make_codec(clock=virtual_clock)
    issued = codec.issue(sub=SUB, token_use="refresh", roles=(), ttl=1.0, family="f")
    await trio.sleep(1.0 + LEEWAY + 1.0)
    assert refused(codec, issued.token, use="access") == "token_expired"


async def test_not_before_in_the_future(autojump_clock: trio.testing.MockClock) -> None:
    codec = make_codec(clock=virtual_clock)
    now = virtual_clock()
    token = forge(claims_at(now, nbf=now + 60.0, exp=now + 60.0 + TTL))
    assert refused(codec, token) == "token_not_yet_valid"

    await trio.sleep(60.0 - LEEWAY - 0.01)
    assert refused(codec, token) == "token_not_yet_valid"
    await trio.sleep(0.01)
    assert trio.current_time() == pytest.approx(60.0 - LEEWAY)  # nbf - leeway: valid
    assert codec.verify(token, use="access").nbf == now + 60.0


async def test_issued_at_in_the_future(autojump_clock: trio.testing.MockClock) -> None:
    codec = make_codec(clock=virtual_clock)
    now = virtual_clock()
    token = forge(claims_at(now, iat=now + 30.0))
    assert refused(codec, token) == "token_not_yet_valid"

    await trio.sleep(30.0 - LEEWAY - 0.01)
    assert refused(codec, token) == "token_not_yet_valid"
    await trio.sleep(0.01)
    assert codec.verify(token, use="access").iat == now + 30.0


async def test_times_are_checked_against_the_injected_clock_not_the_wall_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Tokens from 2023 (EPOCH) are valid for the codec even though the wall clock is later."""
    codec = make_codec(clock=virtual_clock)
    issued = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL)
    assert issued.claims.iat == EPOCH + trio.current_time()
    assert codec.verify(issued.token, use="access").exp == issued.claims.exp


async def test_issue_keeps_exact_times(autojump_clock: trio.testing.MockClock) -> None:
    """No rounding: a revocation at instant t refuses exactly the tokens issued before t."""
    codec = make_codec(clock=virtual_clock)
    await trio.sleep(0.2501234)
    issued = codec.issue(sub=SUB, token_use="access", roles=(), ttl=TTL)
    assert issued.claims.iat == EPOCH + 0.2501234
    assert issued.claims.exp == EPOCH + 0.2501234 + TTL
    assert codec.verify(issued.token, use="access") == issued.claims
