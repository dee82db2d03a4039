"""How a model splits across tensor-parallel ranks (llmbuild/tensor_parallel.py)."""

from __future__ import annotations

import pytest

from llmbuild.tensor_parallel import column_rows, kv_heads_of_rank, rank_config, split_problems
from tests.helpers import config


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_q_head_reads_the_kv_head_it_reads_unsplit(tp):
    cfg = config(heads=8, kv_heads=2)
    share = rank_config(cfg, tp)
    assert share.num_heads * tp == cfg.num_heads and share.intermediate_size * tp == cfg.intermediate_size
    group = cfg.num_heads // cfg.num_kv_heads
    for rank in range(tp):
        kv = kv_heads_of_rank(cfg, tp, rank)
        assert len(kv) == share.num_kv_heads
        rank_group = share.num_heads // share.num_kv_heads
        for local in range(share.num_heads):
            head = rank * share.num_heads + local  # global q head
            assert kv[local // rank_group] == head // group


def test_kv_heads_split_when_enough_and_replicate_when_too_few():
    cfg = config(heads=8, kv_heads=2)
    assert [list(kv_heads_of_rank(cfg, 2, r)) for r in range(2)] == [[0], [1]]
    assert [list(kv_heads_of_rank(cfg, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(kv_heads_of_rank(config(8, 8), 2, r)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    "cfg,tp,named",
    [
        (config(heads=8), 3, "num_attention_heads (8) is not divisible by tensor_parallel (3)"),
        (config(heads=12, kv_heads=3), 2, "num_key_value_heads (3) neither divides"),
        (config(intermediate=500), 8, "intermediate_size (500) is not divisible"),
        (config(heads=6, kv_heads=6), 4, "num_attention_heads (6)"),
    ],
)
def test_impossible_splits_are_named(cfg, tp, named):
    problems = split_problems(cfg, tp)
    assert any(named in p for p in problems), problems


def test_possible_splits_have_no_problems():
    assert split_problems(config(heads=8, kv_heads=2), 8) == []
    assert split_problems(config(heads=8, kv_heads=8), 4) == []
    assert rank_config(config(), 1) == config()


def test_column_rows_are_each_slice_of_the_rank_in_order():
    """qkv: the rank's q rows, then its kv heads' k and v rows; gate_up: its gate rows, then the same of up.
    config(heads=8, kv_heads=2): head_dim 32, q 256 rows, k and v 64 each; intermediate 512."""
    cfg = config(heads=8, kv_heads=2)
    rows = column_rows(cfg, 4, 3, "attn.qkv").tolist()
    assert rows == [*range(192, 256), *range(256 + 32, 256 + 64), *range(320 + 32, 320 + 64)]
    rows = column_rows(cfg, 2, 1, "mlp.gate_up").tolist()
    assert rows == [*range(256, 512), *range(768, 1024)]
    every = sorted(r for rank in range(2) for r in column_rows(cfg, 2, rank, "attn.qkv").tolist())
    assert every == list(range(384))
