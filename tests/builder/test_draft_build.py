"""A draft engine built with its target (speculative.draft): planned and sized with it, built into its draft/
directory and sealed by its manifest, loaded by the runtime; drafts that cannot serve the target refused at plan.

One build (the tiny Llama with an int8 self-draft); everything else is a plan.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmbuild.artifact import pack, unpack
from llmbuild.builder.plan import make_plan
from llmbuild.errors import EngineError, RecipeError
from llmbuild.manifest import Manifest, verify_files
from llmbuild.recipe import SpeculativeSection, load_recipe
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.testing.checkpoints import corpus, make_checkpoint, train_tokenizer_on
from tests.conftest import TINY, write_recipe
from tests.helpers import GREEDY, random_prompt, run_cli

# sequences keep proposing whatever they measure: the tests exercise the draft, not the policy
SPECULATIVE = {"method": "draft", "adaptive": False, "min_acceptance_rate": 0.0}
INT8_DRAFT = {**SPECULATIVE, "draft": {"quantization": {"weights": "int8"}}}
PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K,V x layers x kv heads x head_dim x fp32 bytes (TINY)
# int8 rows: 1 byte per weight instead of 4, plus an fp32 scale per row; lm_head stays fp32 (quantization.exclude)
LAYER_WEIGHTS = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 128 * 64 + 128 * 64 + 64 * 128  # q k v o gate up down
LAYER_ROWS = 64 + 32 + 32 + 64 + 128 + 128 + 64
INT8_SAVING = 2 * (3 * LAYER_WEIGHTS - 4 * LAYER_ROWS)


@pytest.fixture(scope="module")
def engine(make_ckpt, make_engine) -> Path:
    return make_engine("llama-int8-draft", make_ckpt("llama"), speculative=INT8_DRAFT)


@pytest.fixture(scope="module")
def other_tokenizer_ckpt(tmp_path_factory) -> Path:
    """TINY's vocab_size with a tokenizer trained on other text: the same number of ids, other tokens."""
    tokenizer = tmp_path_factory.mktemp("other-tokenizer")
    train_tokenizer_on(tokenizer, [line[::-1] for line in corpus()], TINY["vocab_size"] - 16)
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt-other-tokenizer"), dtype="float32", tokenizer_from=tokenizer, **TINY
    )


def _draft_recipe(tmp_path: Path, checkpoint: Path, speculative: dict) -> Path:
    return write_recipe(tmp_path / "t.yaml", checkpoint, speculative=speculative)


def test_compile_builds_the_draft_inside_the_engine_and_the_manifest_seals_it(engine, tmp_path):
    draft = Manifest.load(engine / "draft")
    assert draft.name == "llama-int8-draft-draft" and draft.quantization.weights == "int8"
    assert draft.speculative is None and draft.model == Manifest.load(engine).model
    manifest = Manifest.load(engine)
    assert "draft/rank0/weights.safetensors" in manifest.files and "draft/manifest.json" in manifest.files
    verify_files(engine, manifest)
    report = json.loads((engine / "report.json").read_text())
    assert not (engine / "draft" / "report.json").exists()
    assert report["draft"]["memory_plan"]["kv_bytes_per_token"] == PER_TOKEN
    assert any(stage.startswith("draft: ") for stage in report["stages_seconds"])
    # an archive carries the draft, and unpacks it checked
    members = pack(engine, tmp_path / "engine.tar")
    assert "draft/rank0/weights.safetensors" in members
    unpack(tmp_path / "engine.tar", tmp_path / "unpacked")
    verify_files(tmp_path / "unpacked", manifest)


def test_a_changed_byte_of_a_draft_file_fails_verify_naming_the_file(engine, tmp_path, capsys):
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    weights = copy / "draft" / "rank0" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="file draft/rank0/weights.safetensors does not match"):
        verify_files(copy, Manifest.load(copy))
    with pytest.raises(EngineError, match="draft: file rank0/weights.safetensors does not match"):
        LLMEngine.from_dir(copy)  # checked against the draft's manifest, which the target's seals
    code, _, err = run_cli(capsys, "verify", str(copy), "--no-smoke")
    assert code == 1 and "draft/rank0/weights.safetensors" in err
    # the draft's own manifest, rewritten to match, is sealed by the target's
    (copy / "draft" / "manifest.json").write_text((copy / "draft" / "manifest.json").read_text() + " ")
    with pytest.raises(EngineError, match="file draft/manifest.json does not match"):
        verify_files(copy, Manifest.load(copy), only=("draft",))
    with pytest.raises(EngineError, match="file draft/manifest.json does not match"):
        LLMEngine.from_dir(copy)
    # an explicit draft engine wins: the built-in one is neither loaded nor checked
    shutil.copytree(engine / "draft", tmp_path / "explicit")
    assert LLMEngine.from_dir(copy, draft_engine=tmp_path / "explicit").speculator.drafter is not None


def test_from_dir_speculates_with_the_built_in_draft_and_greedy_tokens_are_plain_decodings(engine):
    spec, plain = LLMEngine.from_dir(engine), LLMEngine.from_dir(engine, speculative=False)
    assert spec.speculator is not None and spec.speculator.drafter is not None and plain.speculator is None
    prompts = [random_prompt(n, seed) for seed, n in enumerate((5, 17, 40))]
    params = SamplingParams(max_tokens=24, **GREEDY)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    assert [c.token_ids for c in spec.generate(prompts, params)] == expected
    assert spec.speculator.num_draft_tokens > 0 and spec.speculator.num_accepted_tokens > 0
    # method ngram at run time: the draft is not loaded
    ngram = LLMEngine.from_dir(engine, speculative=SpeculativeSection(method="ngram"))
    assert ngram.speculator is not None and ngram.speculator.drafter is None


def test_inspect_shows_the_draft(engine, capsys):
    code, out, _ = run_cli(capsys, "inspect", str(engine))
    line = next(line for line in out.splitlines() if line.startswith("draft "))
    assert code == 0 and "llama-int8-draft-draft" in line and "int8 weights" in line and "MiB" in line


def test_plan_json_sizes_the_draft_and_counts_it_in_the_total(capsys, make_ckpt, tmp_path):
    recipe = _draft_recipe(tmp_path, make_ckpt("llama"), INT8_DRAFT)
    code, out, err = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB", "--json")
    assert code == 0, err
    plan = json.loads(out)
    draft = plan["draft"]
    assert draft["weight_bytes"] == plan["weight_bytes"] - INT8_SAVING
    # the same limits and KV-cache section: room for max_batch_size 8 sequences of 256 tokens
    assert draft["kv_bytes_per_token"] == PER_TOKEN and draft["kv_cache_bytes"] == 8 * 256 * PER_TOKEN
    assert draft["kv_blocks"] == 8 * 256 // 16
    parts = ("weight_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes")
    own = sum(plan[k] for k in parts)
    assert plan["required_bytes"] == own + draft["weight_bytes"] + draft["kv_cache_bytes"]
    code, out, _ = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB")
    assert code == 0 and "draft engine" in out and "+ draft" in out
    # short by the draft alone: refused, the breakdown naming it
    code, _, err = run_cli(capsys, "plan", str(recipe), "--memory", str(own + draft["weight_bytes"]))
    assert code == 1 and "+ draft" in err and "short by" in err


def test_method_draft_without_a_draft_section_plans(make_ckpt, tmp_path):
    plan = make_plan(load_recipe(_draft_recipe(tmp_path, make_ckpt("llama"), {"method": "draft"})))
    assert plan.draft is None  # the runtime needs --draft-engine


def test_a_draft_section_needs_method_draft(make_ckpt, tmp_path):
    recipe = _draft_recipe(tmp_path, make_ckpt("llama"), {"method": "ngram", "draft": {}})
    with pytest.raises(RecipeError, match=r"speculative: draft .* needs method draft \(method is ngram\)"):
        load_recipe(recipe)


def test_a_draft_that_is_the_target_itself_is_refused(make_ckpt, tmp_path):
    recipe = load_recipe(_draft_recipe(tmp_path, make_ckpt("llama"), {"method": "draft", "draft": {}}))
    with pytest.raises(RecipeError, match="speculative.draft: the draft would be the target itself.*cannot"):
        make_plan(recipe)


def test_a_draft_with_another_vocabulary_is_refused_at_plan(make_ckpt, other_tokenizer_ckpt, tmp_path):
    target = make_ckpt("llama")
    other = make_ckpt("llama-vocab-1024", vocab_size=1024)
    recipe = load_recipe(_draft_recipe(tmp_path, target, {"method": "draft", "draft": {"checkpoint": str(other)}}))
    with pytest.raises(RecipeError, match="speculative.draft.checkpoint: its vocab_size is 1024, the target's 512"):
        make_plan(recipe)
    recipe = load_recipe(
        _draft_recipe(tmp_path, target, {"method": "draft", "draft": {"checkpoint": str(other_tokenizer_ckpt)}})
    )
    with pytest.raises(RecipeError, match="speculative.draft.checkpoint: its tokenizer's vocabulary differs"):
        make_plan(recipe)
    missing = load_recipe(_draft_recipe(tmp_path, target, {"method": "draft", "draft": {"checkpoint": "nowhere"}}))
    with pytest.raises(RecipeError, match="speculative.draft.checkpoint: directory not found: .*nowhere"):
        make_plan(missing)


def test_a_draft_checkpoint_with_the_same_tokenizer_plans(make_ckpt, tmp_path):
    other = make_ckpt("llama-draft-1-layer", num_hidden_layers=1)
    recipe = load_recipe(
        _draft_recipe(tmp_path, make_ckpt("llama"), {"method": "draft", "draft": {"checkpoint": str(other)}})
    )
    plan = make_plan(recipe)
    assert plan.draft is not None and plan.draft.checkpoint.config.num_layers == 1
    assert plan.draft.memory.kv_bytes_per_token == PER_TOKEN // 2
