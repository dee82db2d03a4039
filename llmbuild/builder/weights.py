"""Fill a model graph's parameters from a checkpoint, one tensor at a time."""

from __future__ import annotations

import torch

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import LlamaModel, hf_weight_target
from llmbuild.errors import CheckpointError


def load_weights(model: LlamaModel, ckpt: Checkpoint) -> None:
    """Copy every checkpoint tensor into its (possibly fused) parameter, converting dtype on the way.

    Fails naming the tensor on a shape mismatch, an unexpected tensor, or a parameter left unfilled.
    """
    params = dict(model.named_parameters())
    rows_filled = dict.fromkeys(params, 0)
    for name, tensor in ckpt.tensors():
        target = hf_weight_target(model.cfg, name)
        if target is None:
            continue
        pname, first, rows = target
        if pname not in params:
            raise CheckpointError(
                f"unexpected tensor {name!r} in checkpoint: config.json implies the model has no such weight "
                "(check attention_bias / mlp_bias / tie_word_embeddings)"
            )
        dest = params[pname].data[first : first + rows]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(tensor.shape)}, but config.json implies {list(dest.shape)}"
            )
        with torch.no_grad():
            dest.copy_(tensor)
        rows_filled[pname] += rows
    unfilled = [p for p, n in rows_filled.items() if n != params[p].shape[0]]
    if unfilled:
        more = f" (and {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt.path} has no (or duplicate) weights for {unfilled[0]}{more}")
