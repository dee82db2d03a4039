"""The engine graph call: inputs that are views (strided, offset) or of another integer dtype give the
step their values describe, on both backends (issue 27: a compiled package read a column view as if it
were contiguous); caches that are views are refused, never copied; a package with weights compiled into its code is
refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch._inductor import aoti_compile_and_package

from llmbuild.errors import EngineError
from llmbuild.manifest import GRAPH, WEIGHTS
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.graph import CompiledGraph, dense_inputs, load_graph
from llmbuild.runtime.kv_cache import allocate_kv_cache
from tests.helpers import SmallConstants

BS = 16
WIDTH = 16  # blocks per sequence: the tiny engine's max_seq_len 256 in blocks of 16


@pytest.fixture(scope="module", params=["eager", "compiled"])
def engine(request, make_ckpt, make_engine) -> Engine:
    path = make_engine("llama-compiled", make_ckpt("llama"), target={"backend": "compiled"})
    engine = Engine.load(path, backend=request.param)
    assert engine.manifest.kv_cache.block_size == BS and engine.manifest.limits.max_seq_len == BS * WIDTH
    return engine


def two_sequence_step() -> tuple[torch.Tensor, ...]:
    """A prefill of 5 and 3 tokens in one packed step, logits of each sequence's last token."""
    lens = (5, 3)
    ids = torch.tensor([11, 12, 13, 14, 15, 31, 32, 33])
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([b * BS + torch.arange(n) for b, n in enumerate(lens)])  # sequence b in block b
    tables = torch.zeros(2, WIDTH, dtype=torch.int32)
    tables[:, 0] = torch.tensor([0, 1])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    rows = torch.tensor([4, 7])
    return ids, positions, slots, tables, seq_lens, cu, rows, torch.zeros(8, dtype=torch.int32)


def as_views(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The same values as columns of wider tensors, slices at an offset, a transposed copy, wrong dtypes."""
    ids, positions, slots, tables, seq_lens, cu, rows, lora_slots = inputs
    column = torch.stack([ids, ids.flip(0)], dim=1)[:, 0]  # stride 2, as quality.window_logits had it
    offset = torch.cat([torch.tensor([99, 98]), positions])[2:]  # storage offset 2
    transposed = tables.t().contiguous().t()  # strides (1, 2)
    return column, offset, slots.int(), transposed, seq_lens.long(), cu, torch.cat([rows, rows])[2:], lora_slots.long()


def run(engine: Engine, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    caches = allocate_kv_cache(engine.manifest.model, 2, BS, engine.kv_cache_dtype)
    with torch.inference_mode():
        return engine.graph(inputs, caches)


def test_views_and_other_dtypes_give_the_dense_answer(engine):
    dense = two_sequence_step()
    views = as_views(dense)
    assert not views[0].is_contiguous() and views[1].storage_offset() == 2 and not views[3].is_contiguous()
    assert all(torch.equal(v, d) for v, d in zip(views, dense, strict=True))  # the same values
    torch.testing.assert_close(run(engine, views), run(engine, dense), atol=0, rtol=0)


def test_dense_inputs_copy_only_what_needs_it():
    dense = two_sequence_step()
    out = dense_inputs(dense, [])
    assert all(o is d for o, d in zip(out, dense, strict=True))  # the runtime's own inputs: no copy
    fixed = dense_inputs(as_views(dense), [])
    assert all(t.is_contiguous() and t.storage_offset() == 0 for t in fixed)
    assert [t.dtype for t in fixed] == [t.dtype for t in dense]


def test_a_cache_that_is_a_view_is_refused():
    stacked = torch.zeros(2, 4, 2, BS, 16)
    with pytest.raises(ValueError, match="KV cache 1 is a strided or offset view"):
        dense_inputs(two_sequence_step(), [torch.zeros(4, 2, BS, 16), stacked[1]])


def test_a_package_with_weights_in_its_code_is_refused(tmp_path):
    # what Inductor builds without always_keep_tensor_constants (the packages of llmbuild before it set it):
    # the small tensors are literals in the code, so other weights in the engine's file would be ignored
    model, x = SmallConstants(), torch.randn(3, 16)
    rank = tmp_path / "rank0"
    rank.mkdir()
    configs = {"aot_inductor.package_constants_in_so": False}
    aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(rank / GRAPH), inductor_configs=configs)
    save_file(model.state_dict(), rank / WEIGHTS)
    with pytest.raises(EngineError, match=r"model.pt2: the compiled package holds bias in its code .* rebuild"):
        load_graph(rank, "compiled")


def test_the_single_threaded_run_that_cuda_graphs_need_gives_the_same_step(make_ckpt, make_engine):
    path = make_engine("llama-compiled", make_ckpt("llama"), target={"backend": "compiled"})
    threaded = Engine.load(path, backend="compiled")
    single = CompiledGraph(path / "rank0", threaded.graph.weights, single_threaded=True)
    caches = allocate_kv_cache(threaded.manifest.model, 2, BS, threaded.kv_cache_dtype)
    with torch.inference_mode():
        expected = run(threaded, two_sequence_step())
        torch.testing.assert_close(single(two_sequence_step(), caches), expected, atol=0, rtol=0)
