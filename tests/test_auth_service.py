"""AuthService over an in-memory store, under a virtual clock.

The codec's wall clock is ``EPOCH + trio.current_time()`` and the store runs inline, so
virtual time moves only when a test sleeps. Each test takes ``autojump_clock`` itself:
pytest-trio runs a test under a fake clock only when the test function asks for one. The KDF
runs in a worker thread (``trio.to_thread``); with ``autojump_clock`` virtual time could jump
to the next deadline while that thread runs, so these tests set no deadlines of their own (no
``fail_after``: it would fire in virtual time) and take exact times right after the awaited
calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from relayd import _kdf
from relayd._auth import AuthService, Registration, Revocation
from relayd._config import AuthConfig
from relayd._errors import Conflict, NotFound, TokenError, Unauthorized
from relayd._store import Store, inline_executor
from relayd._tokens import TokenCodec

from .support import TEST_SECRET

EPOCH = 1_700_000_000.0
CONFIG = AuthConfig(kdf_cost=1024, access_ttl=900.0, refresh_ttl=86_400.0, leeway=5.0)
UUID = "5d0c9b7a-3c1b-4f8e-a2d4-7e9f10b2c3d4"
OTHER_UUID = "5d0c9b7a-3c1b-4f8e-a2d4-7e9f10b2c3d5"


def virtual_clock() -> float:
    return EPOCH + trio.current_time()


def make_codec() -> TokenCodec:
    return TokenCodec(
        TEST_SECRET.encode(),
        issuer=CONFIG.issuer,
        audience=CONFIG.audience,
        leeway=CONFIG.leeway,
        clock=virtual_clock,
    )


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with Store.open(":memory:", executor=inline_executor) as store:
        yield store


@pytest.fixture
async def auth(store: Store) -> AuthService:
    service = AuthService(store, make_codec(), CONFIG)
    await service.load()
    return service


async def register(auth: AuthService, uuid: str | None = UUID) -> Registration:
    return await auth.register("alice", uuid, source="127.0.0.1")


async def token_error(awaitable_fn: object) -> str:
    raise NotImplementedError  # pragma: no cover


async def authenticate_code(auth: AuthService, token: str) -> str:
    with pytest.raises(TokenError) as exc_info:
        await auth.authenticate(token)
    return exc_info.value.code


async def refresh_code(auth: AuthService, token: str) -> str:
    with pytest.raises(TokenError) as exc_info:
        await auth.refresh(token, source=None)
    return exc_info.value.code


# --- registration and login --------------------------------------------------------------------


async def test_register_then_authenticate(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    assert registration.client.uuid == UUID
    assert registration.client.roles == ("client",)
    assert registration.client_secret not in registration.client.secret_hash
    claims = await auth.authenticate(registration.tokens.access.token)
    assert claims.sub == UUID
    assert claims.roles == ("client",)
    assert not claims.is_operator
    assert (await auth.get_client(UUID)).name == "alice"


async def test_register_without_uuid_generates_one(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    first = await register(auth, None)
    second = await register(auth, None)
    assert first.client.uuid != second.client.uuid
    assert (await auth.authenticate(first.tokens.access.token)).sub == first.client.uuid


async def test_register_taken_uuid_is_a_conflict(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    await register(auth)
    with pytest.raises(Conflict) as exc_info:
        await register(auth)
    assert exc_info.value.code == "uuid_taken"
    assert exc_info.value.status == 409


async def test_login_gives_a_new_pair_in_a_new_family(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    await trio.sleep(1)
    pair = await auth.login(UUID, registration.client_secret, source=None)
    assert (await auth.authenticate(pair.access.token)).sub == UUID
    assert pair.refresh.claims.family is not None
    assert pair.refresh.claims.family != registration.tokens.refresh.claims.family
    # Both logins stay usable.
    assert (await auth.authenticate(registration.tokens.access.token)).sub == UUID


async def test_login_with_wrong_secret(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    with pytest.raises(Unauthorized) as exc_info:
        await auth.login(UUID, registration.client_secret + "x", source=None)
    assert not isinstance(exc_info.value, TokenError)
    assert exc_info.value.code == "invalid_client"


async def test_login_with_unknown_uuid(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    with pytest.raises(Unauthorized) as exc_info:
        await auth.login(OTHER_UUID, registration.client_secret, source=None)
    assert not isinstance(exc_info.value, TokenError)
    assert exc_info.value.code == "invalid_client"


async def test_freshly_issued_tokens_work_at_sub_millisecond_instants(
    autojump_clock: trio.testing.MockClock,
    auth: AuthService,
) -> None:
    """A client registered at any instant can use its tokens at once.

    Tokens carry ``iat`` rounded to the millisecond, but the client's ``tokens_valid_after``
    is the unrounded instant: when the instant rounds down, the new tokens count as issued
    before the client existed and are refused as revoked.
    """
    await trio.sleep(0.0004)
    registration = await register(auth)
    assert (await auth.authenticate(registration.tokens.access.token)).sub == UUID


# --- access-token expiry ----------------------------------------------------------------------


async def test_access_token_expires_at_exactly_ttl_plus_leeway(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    issued_at = trio.current_time()
    access = registration.tokens.access
    assert access.claims.iat == EPOCH + issued_at
    assert access.claims.exp == EPOCH + issued_at + CONFIG.access_ttl

    await trio.sleep(CONFIG.access_ttl + CONFIG.leeway)
    assert trio.current_time() == issued_at + 905.0
    assert (await auth.authenticate(access.token)).jti == access.claims.jti
    assert trio.current_time() == issued_at + 905.0

    await trio.sleep(0.01)
    assert trio.current_time() == pytest.approx(issued_at + 905.01)
    assert await authenticate_code(auth, access.token) == "token_expired"
    # The refresh token lives on and yields a working access token.
    pair = await auth.refresh(registration.tokens.refresh.token, source=None)
    assert (await auth.authenticate(pair.access.token)).sub == UUID


async def test_refresh_token_is_not_an_access_token(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    refresh = registration.tokens.refresh.token
    assert await authenticate_code(auth, refresh) == "token_wrong_type"
    assert await refresh_code(auth, registration.tokens.access.token) == "token_wrong_type"


# --- refresh rotation -------------------------------------------------------------------------


async def test_refresh_rotation_and_reuse_detection(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    first = registration.tokens
    await trio.sleep(10)

    second = await auth.refresh(first.refresh.token, source=None)
    rotated_at = trio.current_time()
    assert second.refresh.token != first.refresh.token
    assert second.access.token != first.access.token
    assert second.refresh.claims.family == first.refresh.claims.family
    assert second.refresh.claims.iat == EPOCH + rotated_at
    assert second.refresh.claims.exp == EPOCH + rotated_at + CONFIG.refresh_ttl
    assert (await auth.authenticate(second.access.token)).sub == UUID

    await trio.sleep(10)
    third = await auth.refresh(second.refresh.token, source=None)

    # An already-rotated token comes back: reuse, and the whole family dies.
    await trio.sleep(10)
    assert await refresh_code(auth, first.refresh.token) == "refresh_reused"
    assert await refresh_code(auth, third.refresh.token) == "token_revoked"
    assert await refresh_code(auth, second.refresh.token) == "token_revoked"
    # Every access token of the family, older and newer, is refused too.
    for pair in (first, second, third):
        assert pair.access.claims.family == first.refresh.claims.family
        assert await authenticate_code(auth, pair.access.token) == "token_revoked"
    # A new login is unaffected.
    pair = await auth.login(UUID, registration.client_secret, source=None)
    assert (await auth.refresh(pair.refresh.token, source=None)).refresh.claims.sub == UUID
    assert (await auth.authenticate(pair.access.token)).sub == UUID


async def test_refresh_twice_with_the_same_token(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    await trio.sleep(1)
    newest = await auth.refresh(registration.tokens.refresh.token, source=None)
    assert await refresh_code(auth, registration.tokens.refresh.token) == "refresh_reused"
    assert await refresh_code(auth, newest.refresh.token) == "token_revoked"


async def test_logout_revokes_the_family(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    await trio.sleep(1)
    rotated = await auth.refresh(registration.tokens.refresh.token, source=None)
    await trio.sleep(1)
    assert await auth.logout(rotated.refresh.token, source=None)
    assert await refresh_code(auth, rotated.refresh.token) == "token_revoked"
    # Already revoked: False, and still refused.
    assert not await auth.logout(rotated.refresh.token, source=None)
    assert await refresh_code(auth, registration.tokens.refresh.token) == "token_revoked"
    assert await authenticate_code(auth, rotated.access.token) == "token_revoked"


async def test_logout_leaves_other_logins_alone(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    other = await auth.login(UUID, registration.client_secret, source=None)
    assert await auth.logout(registration.tokens.refresh.token, source=None)
    assert (await auth.refresh(other.refresh.token, source=None)).access.claims.sub == UUID


async def test_every_revocation_is_announced_after_it_is_stored(
    autojump_clock: trio.testing.MockClock, auth: AuthService, store: Store
) -> None:
    heard: list[Revocation] = []
    auth.subscribe(heard.append)
    registration = await register(auth)
    family = registration.tokens.refresh.claims.family
    await trio.sleep(1)
    rotated = await auth.refresh(registration.tokens.refresh.token, source=None)
    assert heard == []
    assert await refresh_code(auth, registration.tokens.refresh.token) == "refresh_reused"
    assert heard == [Revocation(UUID, "refresh_reused", family=family)]
    stored = await store.get_family(family or "")
    assert stored is not None
    assert stored.revoked_at is not None

    other = await auth.login(UUID, registration.client_secret, source=None)
    assert await auth.logout(other.refresh.token, source=None)
    assert not await auth.logout(other.refresh.token, source=None)  # already: said once
    access = await auth.login(UUID, registration.client_secret, source=None)
    claims = await auth.authenticate(access.access.token)
    await auth.revoke_token(claims, actor=UUID, source=None)
    await auth.revoke_client(UUID, actor="operator:test", source=None)
    await auth.delete_client(UUID, actor="operator:test", source=None)
    assert heard[1:] == [
        Revocation(UUID, "logged_out", family=other.refresh.claims.family),
        Revocation(UUID, "token_revoked", token_id=claims.jti),
        Revocation(UUID, "revoked"),
        Revocation(UUID, "deleted"),
    ]
    assert rotated.access.claims.family == family


# --- revoke and delete --------------------------------------------------------------------------


async def test_revoke_client_refuses_earlier_tokens_and_accepts_a_new_login(
    autojump_clock: trio.testing.MockClock,
    auth: AuthService,
) -> None:
    registration = await register(auth)
    await trio.sleep(1)
    await auth.revoke_client(UUID, actor="operator:ops", source=None)
    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"
    assert await refresh_code(auth, registration.tokens.refresh.token) == "token_revoked"

    await trio.sleep(1)
    pair = await auth.login(UUID, registration.client_secret, source=None)
    assert (await auth.authenticate(pair.access.token)).sub == UUID
    assert (await auth.refresh(pair.refresh.token, source=None)).access.claims.sub == UUID
    # The old tokens stay dead.
    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"


async def test_revoke_client_refuses_tokens_issued_a_fraction_of_a_millisecond_before(
    autojump_clock: trio.testing.MockClock,
    auth: AuthService,
) -> None:
    """ "A revocation at instant t refuses exactly the tokens issued before t" (_tokens.py).

    Issued at t = 0.6 ms, the token's iat is rounded *up* to 1 ms; a revocation at 0.8 ms must
    still refuse it.
    """
    await trio.sleep(0.0006)
    registration = await register(auth)
    await trio.sleep(0.0002)
    await auth.revoke_client(UUID, actor="operator:ops", source=None)
    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"


async def test_revoke_unknown_client(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    with pytest.raises(NotFound) as exc_info:
        await auth.revoke_client(OTHER_UUID, actor="operator:ops", source=None)
    assert exc_info.value.code == "unknown_client"


async def test_delete_client(autojump_clock: trio.testing.MockClock, auth: AuthService) -> None:
    registration = await register(auth)
    await trio.sleep(1)
    await auth.delete_client(UUID, actor="operator:ops", source=None)

    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"
    assert await refresh_code(auth, registration.tokens.refresh.token) == "token_revoked"
    with pytest.raises(NotFound) as not_found:
        await auth.get_client(UUID)
    assert not_found.value.code == "unknown_client"
    with pytest.raises(Conflict) as conflict:
        await register(auth)
    assert conflict.value.code == "uuid_taken"
    with pytest.raises(Unauthorized) as unauthorized:
        await auth.login(UUID, registration.client_secret, source=None)
    assert unauthorized.value.code == "invalid_client"
    assert [c.uuid for c in await auth.list_clients()] == []
    with pytest.raises(NotFound):
        await auth.delete_client(UUID, actor="operator:ops", source=None)


async def test_delete_client_at_the_instant_of_issue(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    """Deletion refuses tokens because the client is gone, whatever their iat."""
    registration = await register(auth)
    await auth.delete_client(UUID, actor="operator:ops", source=None)
    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"


async def test_delete_leaves_other_clients_alone(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    await register(auth)
    other = await register(auth, OTHER_UUID)
    await trio.sleep(1)
    await auth.delete_client(UUID, actor="operator:ops", source=None)
    assert (await auth.authenticate(other.tokens.access.token)).sub == OTHER_UUID
    assert [c.uuid for c in await auth.list_clients()] == [OTHER_UUID]


# --- operator tokens --------------------------------------------------------------------------


async def test_operator_token_needs_no_client_row(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    issued = auth.mint_operator_token("ops", ("admin",), ttl=60.0)
    claims = await auth.authenticate(issued.token)
    assert claims.sub == "operator:ops"
    assert claims.is_operator
    assert claims.is_admin
    assert (await auth.list_clients()) == []


async def test_operator_token_expires(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    issued = auth.mint_operator_token("ops", ("admin",), ttl=60.0)
    await trio.sleep(60.0 + CONFIG.leeway)
    assert (await auth.authenticate(issued.token)).is_operator
    await trio.sleep(0.01)
    assert await authenticate_code(auth, issued.token) == "token_expired"


async def test_revoke_token(autojump_clock: trio.testing.MockClock, auth: AuthService) -> None:
    revoked = auth.mint_operator_token("ops", ("admin",), ttl=60.0)
    kept = auth.mint_operator_token("ops", ("admin",), ttl=60.0)
    claims = await auth.authenticate(revoked.token)
    await auth.revoke_token(claims, actor="operator:root", source=None)
    assert await authenticate_code(auth, revoked.token) == "token_revoked"
    assert (await auth.authenticate(kept.token)).jti == kept.claims.jti


async def test_revoke_a_client_access_token(
    autojump_clock: trio.testing.MockClock, auth: AuthService
) -> None:
    registration = await register(auth)
    claims = await auth.authenticate(registration.tokens.access.token)
    await auth.revoke_token(claims, actor="operator:root", source=None)
    assert await authenticate_code(auth, registration.tokens.access.token) == "token_revoked"
    # Only that access token: the refresh token still works.
    pair = await auth.refresh(registration.tokens.refresh.token, source=None)
    assert (await auth.authenticate(pair.access.token)).sub == UUID


async def test_token_revocations_survive_a_reload(
    autojump_clock: trio.testing.MockClock, store: Store
) -> None:
    first = AuthService(store, make_codec(), CONFIG)
    await first.load()
    issued = first.mint_operator_token("ops", ("admin",), ttl=60.0)
    await first.revoke_token(issued.claims, actor="operator:root", source=None)
    await trio.sleep(30)

    second = AuthService(store, make_codec(), CONFIG)
    await second.load()
    assert await authenticate_code(second, issued.token) == "token_revoked"


async def test_purge_keeps_a_revocation_another_node_stored(
    autojump_clock: trio.testing.MockClock, store: Store
) -> None:
    # Two services on one store, as two cluster nodes: the second never hears of the first's
    # revocation (its hint was lost).
    first = AuthService(store, make_codec(), CONFIG)
    second = AuthService(store, make_codec(), CONFIG)
    await first.load()
    await second.load()
    issued = first.mint_operator_token("ops", ("admin",), ttl=60.0)
    await first.revoke_token(issued.claims, actor="operator:root", source=None)
    assert (await second.authenticate(issued.token)).jti == issued.claims.jti
    await second.purge()
    assert await authenticate_code(second, issued.token) == "token_revoked"


async def test_token_revocations_survive_a_reload_within_the_leeway(
    autojump_clock: trio.testing.MockClock, store: Store
) -> None:
    """A revoked token is accepted up to exp + leeway, so it must stay revoked that long.

    ``AuthService.load`` purges revocations with ``expires_at < now`` and forgets them, while
    the codec still accepts the token until ``exp + leeway``.
    """
    first = AuthService(store, make_codec(), CONFIG)
    await first.load()
    issued = first.mint_operator_token("ops", ("admin",), ttl=60.0)
    await first.revoke_token(issued.claims, actor="operator:root", source=None)
    await trio.sleep(60.0 + CONFIG.leeway / 2)
    assert await authenticate_code(first, issued.token) == "token_revoked"

    second = AuthService(store, make_codec(), CONFIG)
    await second.load()
    assert await authenticate_code(second, issued.token) == "token_revoked"


async def test_a_login_checking_the_old_secret_while_it_is_reset_gets_no_tokens(
    auth: AuthService, store: Store
) -> None:
    """A login reads the client's secret hash, then checks the secret in the KDF (tens of ms).
    If an admin's reset (or a rotation with ``revoke_tokens``) commits in between, the login
    must not come out with a new login that outlives the reset: whoever holds the old secret
    (the reason for the reset) would keep the identity by keeping a login attempt in flight.

    The KDF is held so that the reset commits, as ``reset_secret`` commits it, while the
    login waits for its check."""
    registration = await register(auth)
    kdf = auth._kdf_limiter
    borrowers = [object() for _ in range(int(kdf.total_tokens))]
    for borrower in borrowers:
        await kdf.acquire_on_behalf_of(borrower)
    outcome: dict[str, str] = {}

    async def log_in() -> None:
        try:
            pair = await auth.login(UUID, registration.client_secret, source=None)
        except Unauthorized as exc:
            outcome["refused"] = exc.code
        else:
            outcome["issued"] = pair.access.token

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log_in)
        await trio.testing.wait_all_tasks_blocked()  # the hash is read; the KDF is awaited
        new_hash = _kdf.hash_secret(_kdf.new_client_secret(), n=CONFIG.kdf_cost)
        assert await store.set_secret(UUID, new_hash, revoke_at=auth.now)
        for borrower in borrowers:
            kdf.release_on_behalf_of(borrower)
    assert outcome == {"refused": "invalid_client"}


async def test_registering_again_with_a_token_revoked_since_it_was_checked_gets_no_login(
    auth: AuthService, store: Store
) -> None:
    """``POST /register`` checks the Bearer token, then ``reregister`` makes a new login. A
    reset (or an admin's revoke) committed in between revokes that token: its holder must not
    come out with a login that outlives the reset."""
    registration = await register(auth)
    claims = await auth.authenticate(registration.tokens.access.token)
    new_hash = _kdf.hash_secret(_kdf.new_client_secret(), n=CONFIG.kdf_cost)
    assert await store.set_secret(UUID, new_hash, revoke_at=auth.now)  # as reset_secret does
    with pytest.raises(TokenError) as refused:
        await auth.reregister("alice", UUID, client_secret=None, claims=claims, source=None)
    assert refused.value.code == "token_revoked"


# --- cluster mode ---------------------------------------------------------------------------


async def test_changes_heard_from_other_nodes_reach_every_subscriber_but_the_local_only(
    auth: AuthService,
) -> None:
    """The hub tells the other nodes what changed here (a ``local_only`` subscriber); what it
    hears from them reaches the rest, never that one again: no echo between nodes."""
    everyone: list[tuple[str, tuple[str, ...] | None]] = []
    local: list[tuple[str, tuple[str, ...] | None]] = []
    auth.subscribe_roles(lambda c, r: everyone.append((c, r)))
    auth.subscribe_roles(lambda c, r: local.append((c, r)), local_only=True)
    await register(auth)
    auth.roles_changed_elsewhere("other", ("admin",))
    assert everyone == [(UUID, ("client",)), ("other", ("admin",))]
    assert local == [(UUID, ("client",))]


async def test_an_access_token_revoked_on_another_node_is_refused_here(
    auth: AuthService,
) -> None:
    registration = await register(auth)
    token = registration.tokens.access
    auth.revoked_elsewhere(Revocation(UUID, "token_revoked", token_id=token.claims.jti))
    assert await authenticate_code(auth, token.token) == "token_revoked"
