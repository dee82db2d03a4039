import pytest

from llmbuild.runtime.block_pool import BlockPool, block_hash


def test_allocate_and_free_round_trip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free == 0
    pool.check_integrity()
    pool.free(a)
    assert pool.num_free == 3
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="asked for 4"):
        pool.allocate(4)
    pool.free(b)
    assert pool.num_free == 8
    pool.check_integrity()


def test_double_free_is_refused():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(blocks)


def test_freed_blocks_are_reused():
    pool = BlockPool(2)
    first = pool.allocate(2)
    pool.free(first[:1])
    assert pool.allocate(1) == first[:1]


def test_check_integrity_catches_corruption():
    pool = BlockPool(4)
    pool.allocate(1)
    pool._free.append(pool._free[0])  # a block listed twice
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_empty_pool_is_refused():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_block_hash_chains_parent_and_is_stable():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])  # no per-process salt, unlike hash()
    assert a != block_hash(None, [1, 2, 3, 5])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])


def test_cached_blocks_are_shared_by_reference_and_survive_free():
    pool = BlockPool(4)
    h1, h2 = block_hash(None, [1]), block_hash(block_hash(None, [1]), [2])
    blocks = pool.allocate(2)
    pool.register(blocks[0], h1)
    pool.register(blocks[1], h2)
    assert pool.lookup([h1, h2, b"missing"]) == blocks  # a second owner
    pool.free(blocks)
    pool.free(blocks)  # both owners gone: the blocks stay cached but count as free
    assert pool.num_free == 4 and pool.num_cached == 2
    pool.check_integrity()
    assert pool.lookup([h1]) == blocks[:1]
    pool.check_integrity()
    pool.free(blocks[:1])


def test_eviction_takes_the_least_recently_freed_cached_block_last_resort():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.free([b])
    pool.free([a])
    pool.free([c])  # uncached: handed out before any cached block is evicted
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [b] and pool.num_evictions == 1
    assert pool.lookup([b"b"]) == [] and pool.lookup([b"a"]) == [a]
    pool.check_integrity()


def test_a_prefix_computed_twice_keeps_the_first_copy():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.register(first, b"h")
    pool.register(second, b"h")
    pool.free([second])
    assert pool.num_cached == 1 and pool.lookup([b"h"]) == [first]
    pool.check_integrity()


def test_prefix_caching_can_be_disabled():
    pool = BlockPool(2, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.register(block, b"h")
    assert pool.lookup([b"h"]) == [] and pool.num_cached == 0
