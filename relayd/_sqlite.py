"""What both halves of the SQLite store share: the one connection and how calls reach it.

:class:`SqliteConnection` holds the connection; :class:`relayd._store_clients.SqliteClientStore`
and :class:`relayd._store_messages.SqliteMessageStore` are its two sets of tables, and
:class:`relayd._store.Store` is both, opened as one (see ``relayd/_store.py`` for the theory of
operation).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

from ._atrest import StoreKeys

T = TypeVar("T")
Executor = Callable[..., Awaitable[Any]]


async def inline_executor(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the event loop thread. For tests under a fake clock."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def thread_executor(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the body raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteConnection:
    """The store's connection, used by one call at a time (:meth:`_run`); and a second one,
    read-only, for the reads that may take a while (:meth:`_read`): in WAL mode a reader
    runs beside the writer, so a page of history never waits for a group commit's fsync,
    nor holds one up."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: str,
        executor: Executor,
        keys: StoreKeys | None = None,
        reader: sqlite3.Connection | None = None,
    ) -> None:
        self._db = db
        self._reader = reader
        self._read_limiter = trio.CapacityLimiter(1)
        self.path = path
        self._executor = executor
        self.keys = keys
        """Encrypt message content with these (``None``: plain text, for tests and tools
        that never read a message's fields)."""
        # One call at a time: the connection has exactly one user, the writer.
        self._limiter = trio.CapacityLimiter(1)
        # The highest seq reserve_seqs gave out: one process uses a SQLite file, so
        # reservations need not outlive it (a seq never stored may be given out again).
        self._reserved = 0

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the read-only connection (the writer's, for a store in memory)."""
        if self._reader is None:
            return await self._run(fn)
        async with self._read_limiter:
            result: T = await self._executor(fn, self._reader)
            return result

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        async with self._limiter:
            if inline:
                await trio.lowlevel.checkpoint()  # a checkpoint, as the executor's hand-off is
                return fn(self._db)
            result: T = await self._executor(fn, self._db)
            return result
