"""allocate_kv_cache: one zeroed K and V tensor per layer, never views of one tensor."""

from __future__ import annotations

import torch

from llmbuild.model_config import ModelConfig, RopeConfig
from llmbuild.runtime.kv_cache import allocate_kv_cache

MODEL = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=10000.0),
    max_position_embeddings=64,
)


def test_one_zeroed_tensor_per_layer_for_k_and_for_v():
    caches = allocate_kv_cache(MODEL, num_blocks=5, block_size=8, dtype=torch.bfloat16)
    assert len(caches) == 2 * MODEL.num_layers
    assert all(c.shape == (5, 2, 8, 4) and c.dtype == torch.bfloat16 and not c.any() for c in caches)
    # separate storages, each at offset 0: views of one stacked tensor miscompile (pytorch issue 198068)
    assert len({c.untyped_storage().data_ptr() for c in caches}) == len(caches)
    assert all(c.storage_offset() == 0 and c.is_contiguous() for c in caches)
