import pytest

from llmbuild.runtime.block_pool import BlockPool


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
