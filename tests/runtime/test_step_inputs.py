"""StepInputs: the graph's step inputs by name, in manifest.GRAPH_INPUTS order, with the declarations
(dtype, shape) that the graph check, the export, the capture buffers and the tensor-parallel broadcast
derive from."""

from __future__ import annotations

import pytest
import torch

from llmbuild.manifest import GRAPH_INPUTS
from llmbuild.runtime.step_inputs import INPUT_NAMES, INPUT_SPECS, StepDim, StepInputs, StepShape


def two_sequence_step() -> StepInputs:
    """A prefill of 3 tokens and a decode, block tables 4 wide, blocks of 16."""
    return StepInputs.from_lists(
        input_ids=[11, 12, 13, 21],
        positions=[0, 1, 2, 40],
        slot_mapping=[0, 1, 2, 16 + 8],
        block_tables=[[0, 0, 0, 0], [5, 6, 1, 0]],
        seq_lens=[3, 41],
        cu_seqlens_q=[0, 3, 4],
        logits_indices=[2, 3],
        lora_slots=[1, 1, 1, 0],
    )


def test_the_fields_are_the_graph_inputs_in_order():
    assert INPUT_NAMES == GRAPH_INPUTS[:-1]  # the caches follow the step inputs
    inputs = two_sequence_step()
    assert inputs.as_tuple() == tuple(getattr(inputs, name) for name in GRAPH_INPUTS[:-1])


def test_inputs_from_lists_take_their_declared_dtypes():
    inputs = two_sequence_step()
    assert [t.dtype for t in inputs.as_tuple()] == [s.dtype for s in INPUT_SPECS]
    assert inputs.block_tables.dtype == torch.int32 and inputs.input_ids.dtype == torch.int64
    assert inputs.shape() == StepShape(tokens=4, seqs=2, rows=2, table_width=4)
    with pytest.raises(TypeError, match="step inputs are input_ids, positions"):
        StepInputs.from_lists(input_ids=[1])


def test_every_input_has_the_shape_its_dims_declare():
    inputs = two_sequence_step()
    for spec, tensor in zip(INPUT_SPECS, inputs.as_tuple(), strict=True):
        assert tensor.shape == inputs.shape().sizes(spec.dims), spec.name
    assert StepShape(4, 2, 2, 4).size(StepDim.SEQS_PLUS_ONE) == 3


def test_an_empty_step_holds_one_sequence_boundary():
    empty = StepInputs.empty(table_width=7)
    assert empty.shape() == StepShape(0, 0, 0, 7)
    assert empty.block_tables.shape == (0, 7) and empty.cu_seqlens_q.tolist() == [0]


def test_flatten_and_unflatten_give_back_fresh_tensors_of_the_same_step():
    inputs = two_sequence_step()
    payload = inputs.flatten()
    assert payload.dtype == torch.int64 and payload.numel() == StepInputs.flat_size(inputs.shape())
    back = StepInputs.unflatten(payload, inputs.shape())
    for name, original, received in zip(INPUT_NAMES, inputs.as_tuple(), back.as_tuple(), strict=True):
        assert received.dtype == original.dtype and torch.equal(received, original), name
        # not views into the payload: compiled graphs assume aligned input storage
        assert received.untyped_storage().data_ptr() != payload.untyped_storage().data_ptr(), name


def test_copy_to_writes_every_buffer():
    inputs = two_sequence_step()
    buffers = StepInputs.from_shape(inputs.shape(), torch.zeros)
    inputs.copy_to(buffers)
    assert all(torch.equal(b, t) for b, t in zip(buffers.as_tuple(), inputs.as_tuple(), strict=True))
