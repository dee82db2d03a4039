from __future__ import annotations

import platform

import pytest

from llmbuild.cpu_target import fitting_level
from llmbuild.errors import EngineError, RequestError
from llmbuild.machine import cpu_flags
from llmbuild.manifest import Manifest, Target, verify_files
from llmbuild.runtime.engine import Engine, gpu_mismatch
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.conftest import edit_json


def test_tampered_weights_are_refused_by_load_and_verify(engine_copy):
    path = engine_copy / "rank0" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    for check in (lambda: Engine.load(engine_copy), lambda: verify_files(engine_copy, Manifest.load(engine_copy))):
        with pytest.raises(EngineError, match="file rank0/weights.safetensors does not match its sha256"):
            check()


def test_tampered_tokenizer_and_missing_file(engine_copy):
    (engine_copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(EngineError, match="tokenizer/tokenizer_config.json does not match"):
        Engine.load(engine_copy)
    (engine_copy / "rank0" / "exported.pt2").unlink()
    with pytest.raises(EngineError, match="rank0/exported.pt2 listed in the manifest is missing"):
        verify_files(engine_copy, Manifest.load(engine_copy))


def test_unexpected_file_is_reported_by_verify(engine_copy):
    (engine_copy / "rank0" / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(EngineError, match="unexpected file rank0/extra.so"):
        verify_files(engine_copy, Manifest.load(engine_copy))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"torch_version": "2.99.0+cu130"}, "built with torch 2.99.0+cu130"),
        ({"target__machine": "aarch64" if platform.machine() != "aarch64" else "x86_64"}, "CPUs, this machine is"),
        (
            {"target__required_isa": ["avx512_imaginary"], "target__cpu": "future", "target__cpu_resolved": "future1"},
            "compiled for target.cpu=future (future1), which needs CPU features this machine lacks: avx512_imaginary;"
            f" rebuild it with target.cpu: {fitting_level(cpu_flags())} (runs here) or native",
        ),
        ({"plugins": {"llmbuild::paged_attention": 99}}, "plugin llmbuild::paged_attention version 99"),
        ({"plugins": {"llmbuild::paged_attention": 1, "llmbuild::warp_drive": 1}}, "llmbuild::warp_drive"),
        ({"format_version": 2}, "engine format version 2 is not supported"),
        ({"target__device": "cuda"}, "targets cuda but no GPU"),
        ({"target__backend": "compiled"}, "manifest lists no compiled package rank0/model.pt2"),
    ],
)
def test_engine_for_another_target_is_refused(engine_copy, change, message):
    edit_json(engine_copy / "manifest.json", **change)
    with pytest.raises(EngineError) as exc:
        Engine.load(engine_copy)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "built,here,message",
    [
        (("sm_90", "12.8"), ("sm_90", "12.8"), None),
        (("sm_90", "12.8"), (None, None), "targets cuda but no GPU is available here"),
        (
            ("sm_90", "12.8"),
            ("sm_80", "12.8"),
            "built for sm_90 GPUs, this GPU is sm_80; rebuild it with target.arch=sm_80",
        ),
        (("sm_90", "12.8"), ("sm_90", "13.0"), "built with CUDA 12.8, this runtime's torch has CUDA 13.0"),
    ],
)
def test_cuda_engines_run_only_on_their_gpu_arch_and_cuda(built, here, message):
    target = Target(device="cuda", machine="x86_64", arch=built[0], cuda_version=built[1], backend="compiled")
    reason = gpu_mismatch(target, *here)
    assert reason is None if message is None else message in (reason or "")


def test_not_an_engine(tmp_path):
    with pytest.raises(EngineError, match="engine directory not found"):
        Engine.load(tmp_path / "nothing")
    with pytest.raises(EngineError, match="manifest.json is missing"):
        Engine.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(EngineError, match="corrupt manifest"):
        Engine.load(tmp_path)


@pytest.fixture(scope="module")
def llm(llama_engine) -> LLMEngine:
    return LLMEngine.from_dir(llama_engine)


def test_prompt_longer_than_max_seq_len_is_refused(llm):
    max_len = llm.limits.max_seq_len
    with pytest.raises(RequestError, match=f"prompt has {max_len} tokens but the engine's max_seq_len is {max_len}"):
        llm.make_request([5] * max_len, SamplingParams())


def test_max_tokens_is_clamped_to_the_sequence_limit(llm):
    max_len = llm.limits.max_seq_len
    (done,) = llm.generate([[5] * (max_len - 3)], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 3 and done.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt,message",
    [([], "prompt is empty"), ([5, 512], "token id 512 is out of range"), ([-1], "token id -1 is out of range")],
)
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(RequestError, match=message):
        llm.make_request(prompt, SamplingParams())


def test_text_prompt_stop_string_and_seeded_sampling(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7)
    a = llm.generate(["The quick brown fox"], params)[0]
    b = llm.generate(["The quick brown fox"], params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.prompt_token_ids[0] == 1  # the tokenizer adds BOS
    stop = next(a.text[i : i + 2] for i in range(3, len(a.text) - 2) if len(a.text[i : i + 2].strip()) == 2)
    c = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=24, temperature=1.0, seed=7, stop=(stop,)))[0]
    assert c.finish_reason == "stop" and stop not in c.text and a.text.startswith(c.text)
    llm.pool.check_integrity()
    assert llm.pool.num_free == llm.pool.num_blocks


def test_kv_budget_too_small_for_one_sequence(engine_copy):
    edit_json(engine_copy / "manifest.json", kv_cache__memory_bytes=4096)
    with pytest.raises(EngineError, match="one max_seq_len sequence needs"):
        LLMEngine.from_dir(engine_copy)
