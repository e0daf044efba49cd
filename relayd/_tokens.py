"""JSON Web Tokens: issue and verify, with no I/O and an injected wall clock.

Every token is HS256-signed and carries ``iss``, ``aud``, ``sub`` (the client UUID, or
``operator:<name>`` for operator tokens), ``jti``, ``iat``, ``nbf``, ``exp``, ``roles`` and
``token_use`` (``access`` or ``refresh``). Tokens of a client login also carry ``fam``, the
login's refresh family: required on refresh tokens; on access tokens it lets revoking a login
(log out, refresh-token reuse) refuse the access tokens issued for it too. Times are
fractional epoch seconds so that a revocation at instant *t* refuses exactly the tokens issued
before *t*.

Verification accepts exactly one algorithm (no ``none``, no key confusion with asymmetric
algorithms), requires every claim, checks issuer and audience, and checks the times itself
against the injected clock with ``leeway`` seconds of tolerance, so that token expiry can be
tested under a fake clock. A token of the wrong ``token_use`` is refused: a refresh token is
never an access token, nor the reverse.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Literal

import jwt
from attrs import frozen

from ._errors import TokenError

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
TokenUse = Literal["access", "refresh"]
REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp", "roles", "token_use")


@frozen
class Claims:
    """The verified content of a token."""

    sub: str
    jti: str
    iat: float
    nbf: float
    exp: float
    roles: tuple[str, ...]
    token_use: TokenUse
    family: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_operator(self) -> bool:
        return self.sub.startswith("operator:")


@frozen
class IssuedToken:
    token: str
    claims: Claims


def check_secret(secret: bytes) -> None:
    """Raise ``ValueError`` unless ``secret`` can sign relayd's tokens."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes")
    try:
        jwt.get_algorithm_by_name(ALGORITHM).prepare_key(secret)
    except jwt.InvalidKeyError:
        # PyJWT refuses PEM and SSH keys as HMAC secrets (key confusion): say so up front,
        # not on every issue and verify.
        raise ValueError("the signing secret must not be a PEM or SSH key") from None


class TokenCodec:
    """Issues and verifies relayd's tokens with one HS256 secret."""

    def __init__(
        self,
        secret: bytes,
        *,
        issuer: str,
        audience: str,
        leeway: float,
        clock: Callable[[], float],
    ) -> None:
        check_secret(secret)
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.clock = clock

    def issue(
        self,
        *,
        sub: str,
        token_use: TokenUse,
        roles: tuple[str, ...],
        ttl: float,
        family: str | None = None,
    ) -> IssuedToken:
        # Full float precision (JSON round-trips it exactly): a "valid after" instant taken
        # before issuing is never after the iat of the token issued next.
        now = self.clock()
        claims = Claims(
            sub=sub,
            jti=secrets.token_urlsafe(16),
            iat=now,
            nbf=now,
            exp=now + ttl,
            roles=roles,
            token_use=token_use,
            family=family,
        )
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": claims.sub,
            "jti": claims.jti,
            "iat": claims.iat,
            "nbf": claims.nbf,
            "exp": claims.exp,
            "roles": list(claims.roles),
            "token_use": token_use,
        }
        if family is not None:
            payload["fam"] = family
        return IssuedToken(jwt.encode(payload, self._secret, algorithm=ALGORITHM), claims)

    def verify(self, token: str, *, use: TokenUse) -> Claims:
        """Check signature, claims and times; return the claims.

        Raises:
            TokenError: with ``code`` ``token_invalid`` (malformed, bad signature, wrong
                algorithm, issuer or audience, missing claim), ``token_expired``,
                ``token_not_yet_valid`` or ``token_wrong_type``.
        """
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    # Checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenError("token_invalid", "token has the wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token_invalid", "token has the wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token_invalid", "token algorithm is not allowed") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token_invalid", "token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("token_invalid", f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise TokenError("token_invalid", "token is malformed") from None
        claims = _claims(payload)
        now = self.clock()
        if now > claims.exp + self.leeway:
            raise TokenError("token_expired", "token has expired")
        if now < claims.nbf - self.leeway or now < claims.iat - self.leeway:
            raise TokenError("token_not_yet_valid", "token is not valid yet")
        if claims.token_use != use:
            raise TokenError(
                "token_wrong_type", f"a {claims.token_use} token cannot be used as a {use} token"
            )
        if use == "refresh" and claims.family is None:
            raise TokenError("token_invalid", "refresh token lacks the 'fam' claim")
        return claims


def _number(payload: dict[str, Any], name: str) -> float:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("token_invalid", f"token claim {name!r} is not a number")
    return float(value)


def _string(payload: dict[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value:
        raise TokenError("token_invalid", f"token claim {name!r} is not a string")
    return value


def _claims(payload: dict[str, Any]) -> Claims:
    roles = payload["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenError("token_invalid", "token claim 'roles' is not a list of strings")
    use = payload["token_use"]
    if use not in ("access", "refresh"):
        raise TokenError("token_invalid", "token claim 'token_use' is not access or refresh")
    family = payload.get("fam")
    if family is not None and not isinstance(family, str):
        raise TokenError("token_invalid", "token claim 'fam' is not a string")
    return Claims(
        sub=_string(payload, "sub"),
        jti=_string(payload, "jti"),
        iat=_number(payload, "iat"),
        nbf=_number(payload, "nbf"),
        exp=_number(payload, "exp"),
        roles=tuple(roles),
        token_use=use,
        family=family,
    )
