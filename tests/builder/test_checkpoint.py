from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmbuild.builder import checkpoint as checkpoint_module
from llmbuild.builder.checkpoint import Checkpoint, parse_hf_config
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.weights import load_weights
from llmbuild.errors import CheckpointError
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def base_config(**extra):
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        **extra,
    }


def test_old_and_transformers5_config_keys_agree():
    old, old_dtype, _ = parse_hf_config(
        base_config(rope_theta=500000.0, rope_scaling=dict(LLAMA3), torch_dtype="bfloat16")
    )
    new, new_dtype, _ = parse_hf_config(
        base_config(rope_parameters={**LLAMA3, "rope_theta": 500000.0}, dtype="bfloat16")
    )
    assert old == new
    assert old_dtype == new_dtype == "bfloat16"
    assert old.rope.scaling == "llama3" and old.rope.theta == 500000.0
    legacy, _, _ = parse_hf_config(base_config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope.scaling == "linear" and legacy.rope.factor == 2.0


def test_architecture_specific_options():
    qwen2, _, _ = parse_hf_config(base_config(architectures=["Qwen2ForCausalLM"]))
    qwen3, _, _ = parse_hf_config(base_config(architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert qwen3.qk_norm and qwen3.head_dim == 32
    mistral = parse_hf_config(base_config(architectures=["MistralForCausalLM"], sliding_window=4096))
    assert mistral[2] == 4096


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(CheckpointError) as exc:
        parse_hf_config(base_config(architectures=["GPT2LMHeadModel"]))
    assert "unsupported architecture 'GPT2LMHeadModel'" in str(exc.value)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(exc.value)


@pytest.mark.parametrize(
    "config,message",
    [
        (base_config(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
        (base_config(hidden_act="gelu"), "hidden_act 'gelu'"),
        ({"architectures": ["LlamaForCausalLM"]}, "required key 'hidden_size' is missing"),
        (base_config(num_key_value_heads=3), "num_heads (4) must be a multiple of num_kv_heads (3)"),
        (base_config(dtype="int8"), "dtype 'int8' is not supported"),
    ],
)
def test_bad_config_values(config, message):
    with pytest.raises(CheckpointError) as exc:
        parse_hf_config(config)
    assert message in str(exc.value)


@pytest.fixture
def ckpt_copy(make_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("llama"), dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint.open(tmp_path / "nowhere")


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint.open(ckpt_copy)


def test_corrupt_config(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        Checkpoint.open(ckpt_copy)


def test_truncated_safetensors_names_the_file(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ckpt = Checkpoint.open(ckpt_copy)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        list(ckpt.tensors())


def test_no_tokenizer(ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        Checkpoint.open(ckpt_copy)


def test_pickle_only_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").rename(ckpt_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="reads safetensors only"):
        Checkpoint.open(ckpt_copy)


def test_shape_mismatch_names_the_tensor(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint.open(ckpt_copy)
    model = LlamaModel.empty(ckpt.config, 64, torch.float32)
    with pytest.raises(
        CheckpointError, match=r"tensor 'model.layers.0.mlp.\w+.weight' has shape .* config.json implies"
    ):
        load_weights(model, ckpt)


def test_sharded_checkpoint_reads_one_shard_at_a_time(make_ckpt, monkeypatch):
    ckpt = Checkpoint.open(make_ckpt("llama-sharded", shard_size="60KB"))
    assert len(ckpt.shards) > 2
    open_now, most_open = set(), 0
    real_safe_open = checkpoint_module.safe_open

    class Spy:
        def __init__(self, path, **kw):
            self.path, self.inner = path, real_safe_open(path, **kw)

        def __enter__(self):
            nonlocal most_open
            open_now.add(self.path)
            most_open = max(most_open, len(open_now))
            return self.inner.__enter__()

        def __exit__(self, *exc):
            open_now.discard(self.path)
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(checkpoint_module, "safe_open", Spy)
    model = LlamaModel.empty(ckpt.config, 64, torch.float32)
    load_weights(model, ckpt)
    assert most_open == 1


@pytest.mark.parametrize(
    "name,spec",
    [
        ("llama-sharded", dict(shard_size="60KB")),
        ("llama-bf16-stored", dict(dtype="bfloat16")),
        ("llama-fp16-stored", dict(dtype="float16")),
        ("llama3-old-keys", dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0})),
    ],
)
def test_checkpoint_variants_match_hf(name, spec, make_ckpt, make_engine, tmp_path):
    """Sharded, bf16/fp16-stored and old-key checkpoints: an fp32 engine matches HF in fp32."""
    ckpt = make_ckpt(name, **spec)
    if name == "llama3-old-keys":
        config = json.loads((ckpt / "config.json").read_text())
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = params
        config["torch_dtype"] = config.pop("dtype")
        (ckpt / "config.json").write_text(json.dumps(config))
    llm = LLMEngine.from_dir(make_engine(name, ckpt))
    prompt = [5, 9, 33, 100, 7, 250, 3]
    (ours,) = llm.generate([prompt], SamplingParams(max_tokens=16, min_tokens=16, temperature=0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
    assert ours.token_ids == ref[0, len(prompt) :].tolist()
