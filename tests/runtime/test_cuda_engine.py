"""cuda engines end to end on a GPU: the build (export, retarget to the Triton kernels, move to the GPU,
AOTInductor), the runtime (weights and KV cache on the GPU, CUDA graphs) and the GPU-only formats
(fp8 weights, fp8 KV cache), against transformers on the same GPU.

CI has no GPU, so these are skipped there (the pieces they join are tested on CPU: tests/plugins/triton,
tests/builder/test_retarget.py, tests/runtime/test_cuda_graphs.py); bench/gpu_check.sh runs them on a
lent H100/H200.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmbuild.machine import gpu_arch
from llmbuild.manifest import Manifest
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.helpers import GREEDY, generate, random_prompt, teacher_forced_logits

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; bench/gpu_check.sh runs these on one)"
)

CUDA = {"target": {"device": "cuda", "backend": "compiled"}}
FUSED = {"fused_rms_norm": True, "fused_rope": True, "fused_swiglu": True}


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def cuda_engine(ckpt, make_engine):
    return make_engine("llama-cuda-fp32", ckpt, plugins=FUSED, **CUDA)


def hf_logits(ckpt, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()


def test_the_manifest_records_this_gpu_and_the_engine_runs_on_it(cuda_engine):
    target = Manifest.load(cuda_engine).target
    assert (target.device, target.arch, target.cuda_version) == ("cuda", gpu_arch(), torch.version.cuda)
    llm = LLMEngine.from_dir(cuda_engine)
    assert all(t.is_cuda for t in llm.engine.graph.weights.values())
    assert all(c.is_cuda for c in llm.runner.kv_caches)


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_prefill_and_decode_logits_match_transformers_on_the_gpu(ckpt, cuda_engine, backend):
    llm = LLMEngine.from_dir(cuda_engine, backend=backend)
    prompt, forced = random_prompt(24, 1), random_prompt(64, 2)
    ours = teacher_forced_logits(llm, prompt, forced).cpu()
    ref = hf_logits(ckpt, prompt + forced)
    # fp32 on both sides; cuBLAS and the Triton kernels sum in other orders than the CPU
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)


def test_greedy_tokens_match_transformers_and_the_eager_graph(ckpt, cuda_engine):
    prompt = random_prompt(11, 3)
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0)
    (compiled,) = LLMEngine.from_dir(cuda_engine).generate([prompt], params)
    (eager,) = LLMEngine.from_dir(cuda_engine, backend="eager").generate([prompt], params)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )
    assert compiled.token_ids == eager.token_ids == ref[0, len(prompt) :].tolist()


def test_cuda_graphs_replay_the_tokens_of_plain_steps(ckpt, make_engine):
    engine = make_engine(
        "llama-cuda-graphs", ckpt, plugins=FUSED, cuda_graphs={"enabled": True, "batch_sizes": [1, 2, 4]}, **CUDA
    )
    prompts = [random_prompt(n, 20 + n) for n in (3, 17, 40, 9, 5)]  # 5 sequences: one step above the buckets
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (4, 9, 14, 20, 25)]

    with_graphs = LLMEngine.from_dir(engine)
    assert with_graphs.runner.decode_graphs is not None
    without = LLMEngine.from_dir(engine, cuda_graphs=False)
    assert without.runner.decode_graphs is None
    assert generate(with_graphs, prompts, params) == generate(without, prompts, params)


@pytest.mark.parametrize(
    "quantization",
    [
        {"weights": "fp8"},
        {"weights": "fp8", "fp8_scales": "tensor"},
        {"kv_cache": "fp8"},
        {"weights": "int8"},
        {"weights": "int4", "group_size": 32},
    ],
    ids=["fp8", "fp8-tensor", "kv-fp8", "int8", "int4"],
)
def test_quantized_cuda_engines_pass_their_gate_and_follow_bf16(ckpt, make_engine, quantization):
    bf16 = make_engine("llama-cuda-bf16", ckpt, model={"dtype": "bfloat16"}, plugins=FUSED, **CUDA)
    name = "llama-cuda-" + "-".join(f"{k}-{v}" for k, v in quantization.items())
    engine = make_engine(
        name,
        ckpt,
        model={"dtype": "bfloat16"},
        plugins=FUSED,
        quantization=quantization,
        quality={"max_kl": 0.1, "min_top1": 0.8},  # the build fails (no engine) if the GPU check misses these
        **CUDA,
    )
    prompt, forced = random_prompt(40, 5), random_prompt(8, 6)
    ours = teacher_forced_logits(LLMEngine.from_dir(engine), prompt, forced).cpu()
    ref = teacher_forced_logits(LLMEngine.from_dir(bf16), prompt, forced).cpu()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8, f"{name}: next-token agreement with the bf16 engine {agree:.2f}"
