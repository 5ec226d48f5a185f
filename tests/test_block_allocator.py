"""BlockAllocator against a plain-set model of the pool: no leaks, no double hand-outs,
loud failures on double frees and foreign ids."""

from __future__ import annotations

import random

import pytest

from inlaid_ray.engine import BlockAllocator, blocks_for
from inlaid_ray.errors import NoFreeSlot


def test_blocks_for_is_ceil_division():
    for n in range(0, 50):
        for bs in (1, 3, 4, 16):
            assert blocks_for(n, bs) == len(range(0, n, bs))


def test_random_allocate_free_matches_set_model():
    rng = random.Random(0)
    alloc = BlockAllocator(37)
    owned: list[list[int]] = []  # what callers hold
    free_ref = set(range(37))
    for _ in range(3000):
        if owned and rng.random() < 0.45:
            blocks = owned.pop(rng.randrange(len(owned)))
            alloc.free(blocks)
            free_ref |= set(blocks)
        else:
            n = rng.randrange(0, 6)
            if n > len(free_ref):
                with pytest.raises(NoFreeSlot, match=f"need {n} KV blocks, only {len(free_ref)}"):
                    alloc.allocate(n)
                continue
            blocks = alloc.allocate(n)
            assert len(blocks) == n and len(set(blocks)) == n
            assert set(blocks) <= free_ref, f"handed out blocks already in use: {set(blocks) - free_ref}"
            free_ref -= set(blocks)
            owned.append(blocks)
        assert alloc.num_free == len(free_ref)
        assert all(alloc.is_free(b) == (b in free_ref) for b in range(37))
    for blocks in owned:
        alloc.free(blocks)
    assert alloc.num_free == alloc.num_blocks == 37 and alloc.usage == 0.0


def test_double_free_and_foreign_ids_fail_and_leave_pool_intact():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    alloc.free(a[:1])
    with pytest.raises(AssertionError, match=f"double free of KV block {a[0]}"):
        alloc.free(a)  # a[0] is already free: nothing of this call may be applied
    assert alloc.num_free == 6 and not alloc.is_free(a[1])
    with pytest.raises(AssertionError, match="block id 8 is not in this pool of 8"):
        alloc.free([8])
    with pytest.raises(AssertionError, match="block id -1 is not in this pool"):
        alloc.free([-1])
    with pytest.raises(AssertionError, match="repeated"):
        alloc.free([a[1], a[1]])
    alloc.free(a[1:])
    assert alloc.num_free == 8


def test_over_allocation_takes_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(NoFreeSlot):
        alloc.allocate(2)
    assert alloc.num_free == 1 and alloc.can_allocate(1) and not alloc.can_allocate(2)
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockAllocator(0)
