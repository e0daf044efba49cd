"""Message seqs, handed out by the core from blocks the store reserves.

A message's seq is allocated when it is accepted and orders its first deliveries (see
relayd/_relay/core.py). On SQLite one process owns the file, so one block without end does.
On Redis many nodes share the counter: each reserves blocks of it (one ``INCRBY`` per block),
so seqs stay unique across nodes; a client that moves to another node raises that node's
*floor* to the counter as it was when the client arrived (see :meth:`SeqPool.raise_floor`), so
what the client sends from the new node sorts after what it sent from the old one.
"""

from __future__ import annotations

import math

from attrs import define


@define
class SeqPool:
    """Seqs ``next`` .. ``end - 1`` are reserved and unused (``end`` infinite: no end)."""

    next: int
    end: float
    block: int = 0  # how many to reserve at a time (0: never reserved, the pool has no end)
    reserving: bool = False  # a reservation was asked for and has not come back
    floor: int = 0  # no seq at or below this may be handed out (see raise_floor)

    @classmethod
    def endless(cls, last_seq: int) -> SeqPool:
        """Every seq above ``last_seq`` (one process owns the store)."""
        return cls(last_seq + 1, math.inf)

    @classmethod
    def reserved(cls, block: int) -> SeqPool:
        """An empty pool that reserves ``block`` seqs at a time."""
        return cls(1, 1, block)

    @property
    def remaining(self) -> float:
        return self.end - self.next

    @property
    def low(self) -> bool:
        """Time to reserve the next block: half of this one is used."""
        return bool(self.block) and not self.reserving and self.remaining < self.block / 2

    def take(self) -> int | None:
        """The next seq, or ``None`` if the pool is empty (a reservation is due)."""
        if self.next >= self.end:
            return None
        seq = self.next
        self.next += 1
        return seq

    def add(self, start: int, count: int) -> None:
        """A reserved block came back: it replaces what is left (a fresh block is above it).
        A floor raised while it was on its way still holds: the part of the block at or below
        it is skipped (the pool may be empty again, and then ``low``)."""
        self.reserving = False
        self.next, self.end = max(start, self.floor + 1), start + count

    def raise_floor(self, floor: int) -> bool:
        """Seqs at or below ``floor`` may not be used any more: ``True`` if the pool had to be
        emptied for that (a reservation is due).

        ``floor`` is the store's counter when a client arrived. Below ``end`` it can only be
        the end of this pool's own block (the counter is at least that since the block was
        reserved): nobody has reserved since, so every seq the client had elsewhere is below
        this block, and the pool stays."""
        self.floor = max(self.floor, floor)
        if self.next > floor or floor < self.end:
            return False
        self.next = self.end = floor + 1  # empty, and nothing below the floor comes back
        return True
