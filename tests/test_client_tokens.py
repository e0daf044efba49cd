"""The token keeper (``relayd.client._tokens``): refresh with rotation, never presenting a
spent refresh token, whatever fails in between.

:class:`FakeIssuer` is relayd's refresh rotation in miniature (``relayd._auth``): each refresh
token is good once, and presenting a spent one is reuse, which relayd answers by revoking the
whole login (and its live session). Each call's fate is scripted: answered, refused before
relayd read it (429, or no connection), answered but the answer lost, or the client process
dying with the answer in flight.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Literal

import anyio
import anyio.lowlevel
import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.client import (
    AuthenticationError,
    Credentials,
    HttpError,
    MemoryCredentials,
    ServerUnreachable,
    TokenPair,
)
from relayd.client._tokens import REFRESH_TOKEN_MARGIN, TokenKeeper, refresh_due

NOW = 1000.0
ACCESS_TTL = 900.0
REFRESH_TTL = 86_400.0
SECRET = "client-secret"

Fate = Literal["ok", "unreachable", "rate_limited", "lost", "crash", "revoked"]
FATES: list[Fate] = ["ok", "unreachable", "rate_limited", "lost", "crash", "revoked"]


class Crash(Exception):
    """The client process died while a request was in flight: only what the store holds
    survives."""


class SavingStore(MemoryCredentials):
    """Memory credentials whose save is a checkpoint (as a file's is) and is recorded."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self.saved: list[Credentials] = []

    async def save(self, credentials: Credentials) -> None:
        await anyio.lowlevel.checkpoint()
        await super().save(credentials)
        self.saved.append(credentials)


class FakeIssuer:
    """relayd's token endpoints: logins are families of refresh tokens, each good once."""

    def __init__(self, store: SavingStore, fates: Iterable[Fate] = ()) -> None:
        self.store = store
        self.fates = iter(fates)
        self.family_of: dict[str, int] = {}  # every refresh token issued -> its login
        self.spent: set[str] = set()
        self.revoked: set[int] = set()
        self.presented: list[str] = []  # refresh tokens relayd read, in order
        self.reused: list[str] = []
        self.logins = 0
        self.cancel_on_answer: anyio.CancelScope | None = None
        self._serial = itertools.count()
        self._families = itertools.count()

    def issue(self, family: int) -> TokenPair:
        n = next(self._serial)
        pair = TokenPair(
            access_token=f"access-{n}",
            refresh_token=f"refresh-{n}",
            access_expires_at=NOW + ACCESS_TTL,
            access_issued_at=NOW,
            refresh_expires_at=NOW + REFRESH_TTL,
        )
        self.family_of[pair.refresh_token] = family
        return pair

    def live(self, refresh_token: str) -> bool:
        family = self.family_of.get(refresh_token)
        return family is not None and family not in self.revoked and refresh_token not in self.spent

    def _fate(self) -> Fate:
        return next(self.fates, "ok")

    def _before_reading(self, fate: Fate) -> None:
        if fate == "unreachable":
            raise ServerUnreachable("connection refused", maybe_delivered=False)
        if fate == "rate_limited":
            raise HttpError(429, "rate_limited", "slow down", {"retry_after": 1})

    def _answer(self, fate: Fate, pair: TokenPair) -> TokenPair:
        if fate == "lost":
            raise ServerUnreachable("read timed out", maybe_delivered=True)
        if fate == "crash":
            raise Crash
        if self.cancel_on_answer is not None:
            self.cancel_on_answer.cancel()
        return pair

    async def login(self, uuid: str, client_secret: str) -> TokenPair:
        await anyio.lowlevel.checkpoint()
        fate = self._fate()
        self._before_reading(fate)
        if client_secret != SECRET:
            raise HttpError(401, "invalid_client", "unknown client or wrong secret")
        self.logins += 1
        return self._answer(fate, self.issue(next(self._families)))

    async def refresh(self, refresh_token: str) -> TokenPair:
        # The keeper's rule 1: what is presented was marked in flight, durably, first.
        stored = self.store.credentials
        assert stored.refresh_in_flight
        assert stored.tokens is not None
        assert stored.tokens.refresh_token == refresh_token
        await anyio.lowlevel.checkpoint()
        fate = self._fate()
        self._before_reading(fate)
        self.presented.append(refresh_token)
        family = self.family_of[refresh_token]
        if refresh_token in self.spent:
            self.reused.append(refresh_token)
            self.revoked.add(family)
            raise HttpError(401, "refresh_reused", "refresh token reused: login revoked")
        self.spent.add(refresh_token)
        if fate == "revoked" or family in self.revoked:
            self.revoked.add(family)
            raise HttpError(401, "token_revoked", "the login was revoked")
        return self._answer(fate, self.issue(family))


def registered(issuer_fates: Iterable[Fate] = ()) -> tuple[SavingStore, FakeIssuer]:
    """A client as registration leaves it: its secret and a first pair, saved."""
    store = SavingStore(
        Credentials(url="http://relayd", uuid="u", name="alice", client_secret=SECRET)
    )
    issuer = FakeIssuer(store, issuer_fates)
    store.credentials = store.credentials.with_tokens(issuer.issue(next(issuer._families)))
    return store, issuer


def keeper_for(store: SavingStore, issuer: FakeIssuer) -> TokenKeeper:
    """A keeper as a client (re)started on ``store`` builds it."""
    return TokenKeeper(store, issuer, store.credentials, clock=lambda: NOW)


def tokens(store: SavingStore) -> TokenPair:
    pair = store.credentials.tokens
    assert pair is not None
    return pair


# --- the order of things ------------------------------------------------------------------------


async def test_a_refresh_marks_the_token_spent_then_saves_the_new_pair_before_using_it() -> None:
    store, issuer = registered()
    first = tokens(store)
    token = await keeper_for(store, issuer).renew()
    marked, renewed = store.saved
    assert (marked.refresh_in_flight, marked.tokens) == (True, first)
    assert renewed.refresh_in_flight is False
    assert renewed.tokens is not None
    assert token == renewed.tokens.access_token
    assert issuer.presented == [first.refresh_token]
    assert issuer.live(renewed.tokens.refresh_token)
    assert issuer.logins == 0


async def test_an_unanswered_refresh_is_never_presented_again() -> None:
    store, issuer = registered(["lost"])
    first = tokens(store)
    keeper = keeper_for(store, issuer)
    token = await keeper.renew()  # the answer was lost: log in with the secret instead
    assert issuer.presented == [first.refresh_token]
    assert issuer.logins == 1
    assert token == tokens(store).access_token
    from_login = tokens(store).refresh_token
    await keeper.renew()  # the new login's refresh token, once
    assert issuer.presented == [first.refresh_token, from_login]
    assert issuer.reused == []


async def test_after_a_crash_with_a_refresh_in_flight_the_next_run_logs_in() -> None:
    store, issuer = registered(["crash"])
    first = tokens(store)
    with pytest.raises(Crash):
        await keeper_for(store, issuer).renew()
    assert store.credentials.refresh_in_flight is True  # what the crash left on disk
    token = await keeper_for(store, issuer).renew()
    assert issuer.presented == [first.refresh_token]
    assert (issuer.logins, issuer.reused) == (1, [])
    assert token == tokens(store).access_token
    assert store.credentials.refresh_in_flight is False


@pytest.mark.parametrize(
    ("fate", "error"), [("unreachable", ServerUnreachable), ("rate_limited", HttpError)]
)
async def test_a_refresh_relayd_did_not_read_keeps_its_token(
    fate: Fate, error: type[Exception]
) -> None:
    store, issuer = registered([fate])
    first = tokens(store)
    keeper = keeper_for(store, issuer)
    with pytest.raises(error):
        await keeper.renew()
    assert (store.credentials.refresh_in_flight, store.credentials.tokens) == (False, first)
    await keeper.renew()  # the same token, read this time
    assert issuer.presented == [first.refresh_token]
    assert issuer.logins == 0


async def test_a_refused_refresh_token_is_dropped_for_a_login() -> None:
    store, issuer = registered(["revoked"])
    first = tokens(store)
    token = await keeper_for(store, issuer).renew()
    assert issuer.presented == [first.refresh_token]
    assert issuer.logins == 1
    assert token == tokens(store).access_token


async def test_a_refused_secret_is_final() -> None:
    store, issuer = registered(["revoked"])
    store.credentials = attrs.evolve(store.credentials, client_secret="wrong")
    with pytest.raises(AuthenticationError, match="refused the secret of alice"):
        await keeper_for(store, issuer).renew()


async def test_a_refresh_token_about_to_expire_is_not_presented() -> None:
    store, issuer = registered()
    pair = tokens(store)
    store.credentials = store.credentials.with_tokens(
        attrs.evolve(pair, refresh_expires_at=NOW + REFRESH_TOKEN_MARGIN - 0.1)
    )
    await keeper_for(store, issuer).renew()
    assert (issuer.presented, issuer.logins) == ([], 1)


async def test_the_access_token_is_kept_until_it_is_due() -> None:
    store, issuer = registered()
    first = tokens(store)
    due = refresh_due(first, margin=60.0)
    assert due == NOW + ACCESS_TTL - 60.0
    clock = [due - 0.001]
    keeper = TokenKeeper(store, issuer, store.credentials, clock=lambda: clock[0])
    assert await keeper.access_token(margin=60.0) == first.access_token
    assert issuer.presented == []
    clock[0] = due
    assert await keeper.access_token(margin=60.0) == tokens(store).access_token
    assert issuer.presented == [first.refresh_token]


async def test_a_new_pair_is_saved_even_if_the_caller_is_cancelled_meanwhile() -> None:
    store, issuer = registered()
    with anyio.CancelScope() as scope:
        issuer.cancel_on_answer = scope
        await keeper_for(store, issuer).renew()
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    # relayd spent the old token and issued this pair: it reached the store.
    assert store.credentials.refresh_in_flight is False
    assert issuer.live(tokens(store).refresh_token)


# --- whatever happens, in any order ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FATES), max_size=30))
def test_no_sequence_of_failures_makes_the_keeper_present_a_spent_token(
    fates: list[Fate],
) -> None:
    async def scenario() -> None:
        store, issuer = registered(fates)
        keeper = keeper_for(store, issuer)
        for _ in range(len(fates) + 1):
            try:
                token = await keeper.renew()
            except Crash:
                keeper = keeper_for(store, issuer)
                continue
            except (HttpError, ServerUnreachable):
                continue
            # Renewed: the pair in the store is the one in use, and relayd takes it.
            assert token == tokens(store).access_token
            assert store.credentials.refresh_in_flight is False
            assert issuer.live(tokens(store).refresh_token)
        assert issuer.reused == []
        assert len(issuer.presented) == len(set(issuer.presented))

    trio.run(scenario)
