"""The seq pool's floor (relayd/_relay/seqs.py): a client arriving on a node empties the
node's pool only when some seq it may have had elsewhere is not below the pool."""

from __future__ import annotations

from relayd._relay.seqs import SeqPool


def test_a_floor_at_the_end_of_the_pools_own_block_keeps_the_pool() -> None:
    # The counter stood at 30 when the client arrived: this pool's block (21-30) was the last
    # one reserved, so whatever the client sent from other nodes has seqs below 21.
    pool = SeqPool.reserved(10)
    pool.add(21, 10)
    assert pool.take() == 21
    assert not pool.raise_floor(30)
    assert pool.take() == 22


def test_a_floor_past_the_pools_block_empties_it() -> None:
    # Another node reserved 31-40 since: the client may have sent with those.
    pool = SeqPool.reserved(10)
    pool.add(21, 10)
    assert pool.raise_floor(40)
    assert pool.take() is None
    pool.add(41, 10)
    assert pool.take() == 41


def test_a_floor_raised_while_a_block_is_on_its_way_holds_when_it_comes() -> None:
    """Another node reserved between this node's INCRBY and a client's claim: the block that
    comes back is partly (or wholly) below the client's floor, and that part is skipped."""
    pool = SeqPool.reserved(10)
    pool.reserving = True  # a reservation is on its way: [11, 20]
    assert pool.raise_floor(15)
    pool.add(11, 10)
    assert pool.take() == 16
    pool.reserving = True  # and one wholly below a floor: empty again, so reserve again
    assert pool.raise_floor(40)
    pool.add(21, 10)
    assert pool.take() is None
    assert pool.low
