"""BlockPool: the KV-cache block allocator, with prefix caching.

A block that holds a full block_size tokens can be registered under a content hash (the hash of
its parent block's hash and its own token ids, so equal hashes mean equal prefixes). Requests that
start with the same tokens then share those blocks by reference count instead of recomputing them.
A cached block whose last reference is dropped keeps its contents and stays findable until the
pool needs the space: such blocks are evicted least-recently-freed first.

The pool knows nothing of requests; the scheduler decides who gets blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Content hash of one full block: stable across processes (unlike Python's hash())."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockPool:
    """Free list of block ids with reference counts, plus the prefix cache of full blocks."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}
        # unreferenced blocks that still hold a cached prefix, oldest first (the next to evict)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out (empty ones and evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks (reference count 1 each), evicting cached ones if the free list runs dry."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(b)]
                self.num_evictions += 1
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (or evictable if cached)."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each now referenced once more."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            hits.append(b)
        for b in hits:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        return hits

    def register(self, block: int, h: bytes) -> None:
        """Record that `block` (referenced, full) holds the prefix with hash h."""
        if not self.enable_prefix_caching or block in self._hash_of or h in self._cached:
            return  # another request computed the same prefix first; this copy stays private
        self._hash_of[block] = h
        self._cached[h] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (referenced blocks stay allocated)."""
        for b in self._evictable:
            self._free.append(b)
        self._evictable.clear()
        self._hash_of.clear()
        self._cached.clear()

    def check_integrity(self) -> None:
        """Every block is free (listed once), evictable (cached, count 0) or in use (count > 0)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is listed twice in the free list"
        assert not free & set(self._evictable), "a block is both free and evictable"
        for b, refs in enumerate(self._refs):
            assert refs >= 0, f"block {b} has a negative reference count"
            idle = b in free or b in self._evictable
            assert (refs == 0) == idle, f"block {b}: refs {refs} but idle={idle}"
            assert b not in self._evictable or b in self._hash_of, f"evictable block {b} has no hash"
        assert all(self._cached[h] == b for b, h in self._hash_of.items()), "prefix cache maps disagree"
