"""BlockPool: the KV-cache block allocator. It hands out block ids and takes them back; it knows
nothing of requests (the scheduler decides who gets blocks)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockPool:
    """Free list of block ids with reference counts (a block returns to the free list at zero)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (reference count 1 each). The caller checks num_free first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks no longer referenced become free."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        """Every block is either free (count 0, listed once) or in use (count > 0, not listed)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is listed twice in the free list"
        for b, refs in enumerate(self._refs):
            assert refs >= 0, f"block {b} has a negative reference count"
            assert (refs == 0) == (b in free), f"block {b}: refs {refs} but free={b in free}"
