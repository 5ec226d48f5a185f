"""Free list of paged-KV block ids (vLLM's block manager without prefix sharing).

The allocator only hands out and takes back integer ids; each request keeps its own block
table (a list of ids) that grows by one block whenever its tokens cross a block boundary.
Ids of one pool are `0 .. num_blocks-1`; the KV tensors themselves live in `PagedKVCache`.
"""

from __future__ import annotations

from collections.abc import Iterable

from inlaid_ray.errors import NoFreeSlot
from inlaid_ray.sched.admission import blocks_for  # noqa: F401  (one definition; re-exported for the engine)


class BlockAllocator:
    """Hands out KV block ids from a fixed pool; catches double frees and foreign ids."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        # LIFO: the most recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0.0 .. 1.0."""
        return self.num_used / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free block ids; raises NoFreeSlot (and takes none) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate n={n} blocks")
        if n > len(self._free):
            raise NoFreeSlot(f"need {n} KV blocks, only {len(self._free)} of {self.num_blocks} free")
        blocks = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        for b in blocks:
            self._is_free[b] = 0
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks to the pool; a double free or an id outside the pool is a bug (assert)."""
        blocks = list(blocks)
        # Check everything before touching state, so a failed call leaves the pool as it was.
        for b in blocks:
            assert isinstance(b, int) and 0 <= b < self.num_blocks, (
                f"block id {b!r} is not in this pool of {self.num_blocks}"
            )
            assert not self._is_free[b], f"double free of KV block {b}"
        assert len(set(blocks)) == len(blocks), f"block ids repeated in one free: {sorted(blocks)}"
        for b in blocks:
            self._is_free[b] = 1
        self._free.extend(blocks)

    def is_free(self, block: int) -> bool:
        return bool(self._is_free[block])
