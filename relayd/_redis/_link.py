"""The store's one way to Redis: its Lua script, called by SHA with a deadline, and every
coredis error turned into a :class:`~relayd._errors.StoreError`.

Each call is one ``EVALSHA``: one round trip, atomic on the server. The script is loaded once
(``SCRIPT LOAD`` at open); a server that lost it (a restart, a failover, ``SCRIPT FLUSH``)
answers ``NOSCRIPT`` without running anything, and the call loads it again and repeats itself,
once, within the same deadline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import anyio
import coredis
import msgspec
import trio
from coredis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ReplicationError,
    ResponseError,
    TryAgainError,
)

from relayd._errors import StoreError, StoreUnavailable

T = TypeVar("T")

SCRIPT = resources.files(__package__).joinpath("store.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()

# Error replies that say "not now" rather than "not this": the server is loading its data, is
# a replica (a failover moved the primary), is out of memory, or is busy with a long script.
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "OOM", "BUSY", "NOREPLICAS", "TRYAGAIN")
# What a broken or refused connection surfaces as, below coredis's own ConnectionError.
_CONNECTION_FAILURES = (
    ConnectionError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
_encode = msgspec.msgpack.Encoder().encode


class Link:
    """Calls the store's script on ``client``, each call within ``timeout`` seconds; after a
    write, waits for ``wait_replicas`` replicas to acknowledge it (``WAIT``), for at most
    ``wait_timeout`` seconds more."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        where: str,
        prefix: str,
        timeout: float,
        wait_replicas: int,
        wait_timeout: float,
    ) -> None:
        self._client = client
        self.where = where
        self._prefix = prefix
        self.timeout = timeout
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.closed = False

    async def load(self) -> None:
        """Load the script (``SCRIPT LOAD``), which also checks that the server answers."""
        await self.command("SCRIPT LOAD", lambda client: client.script_load(SCRIPT))

    async def call(self, operation: str, args: Any, *, write: bool) -> Any:
        """Run ``operation`` of the script with ``args`` (packed as MessagePack); return its
        reply (bulk strings as bytes).

        Cancelled, or past the deadline, a call that was sent runs or not as a whole: the
        script is atomic, only its reply is lost.

        Raises:
            StoreUnavailable: Redis did not answer in time, cannot be reached, cannot take
                the operation now, or (``write``) too few replicas acknowledged it.
            StoreError: Redis refused the operation (the script's checks, or bad data).
        """
        payload = _encode(args)
        waiting = write and self.wait_replicas > 0
        deadline = self.timeout + (self.wait_timeout if waiting else 0.0)

        async def evalsha(client: coredis.Redis[bytes]) -> Any:
            arguments = [self._prefix, operation, payload]
            if waiting:
                timeout_ms = max(1, int(self.wait_timeout * 1000))
                with client.ensure_replication(self.wait_replicas, timeout_ms):
                    return await self._evalsha(client, arguments)
            return await self._evalsha(client, arguments)

        return await self.command(operation, evalsha, deadline=deadline)

    async def _evalsha(self, client: coredis.Redis[bytes], arguments: list[Any]) -> Any:
        try:
            return await client.evalsha(SCRIPT_SHA, args=arguments)
        except NoScriptError:
            # Nothing ran: load the script again and repeat the call.
            await client.script_load(SCRIPT)
            return await client.evalsha(SCRIPT_SHA, args=arguments)

    async def command(
        self,
        what: str,
        fn: Callable[[coredis.Redis[bytes]], Awaitable[T]],
        *,
        deadline: float | None = None,
    ) -> T:
        """``await fn(client)`` within the deadline (``timeout`` by default), its errors
        translated (see :meth:`call`)."""
        if self.closed:
            raise StoreError(f"{self.where}: the store is closed")
        limit = self.timeout if deadline is None else deadline
        with trio.move_on_after(limit):
            try:
                return await fn(self._client)
            except ReplicationError:
                raise StoreUnavailable(
                    f"{self.where}: fewer than {self.wait_replicas} replicas acknowledged a"
                    f" write within {self.wait_timeout:g} s (it is on the primary, not yet as"
                    " durable as store.wait_replicas asks)"
                ) from None
            except AuthenticationError as exc:
                raise StoreUnavailable(
                    f"{self.where}: refused relayd's credentials: {exc}"
                ) from None
            except ResponseError as exc:
                raise self._refused(what, exc) from None
            except _CONNECTION_FAILURES as exc:
                raise StoreUnavailable(
                    f"{self.where}: cannot reach Redis ({what}): {_reason(exc)}"
                ) from None
            except RedisError as exc:
                raise StoreError(f"{self.where}: {what} failed: {exc}") from None
        raise StoreUnavailable(f"{self.where}: Redis did not answer within {limit:g} s ({what})")

    def _refused(self, what: str, exc: ResponseError) -> StoreError:
        text = str(exc)
        if text.startswith("RELAYD "):
            return StoreError(f"{self.where}: {what}: {text.removeprefix('RELAYD ')}")
        transient = isinstance(exc, ReadOnlyError | TryAgainError)  # coredis strips the code
        if transient or text.split(" ", 1)[0] in _TRANSIENT_REPLIES:
            return StoreUnavailable(f"{self.where}: Redis cannot take {what} now: {text}")
        return StoreError(f"{self.where}: Redis refused {what}: {text}")


def _reason(exc: BaseException) -> str:
    """What failed, down to the root cause (coredis wraps the socket's error)."""
    reasons = [str(exc) or type(exc).__name__]
    while exc.__cause__ is not None:
        exc = exc.__cause__
        reasons.append(str(exc) or type(exc).__name__)
    return ": ".join(reasons)
