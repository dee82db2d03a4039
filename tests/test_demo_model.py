"""The committed demo model (models/demo, trained by tools/train_demo_model.py): loadable by
transformers, as good on its held-out text as its training report says, and our engine generates
what transformers generates from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.structured_output import Grammar
from llmbuild.testing.checkpoints import CHAT_TEMPLATE

DEMO = Path(__file__).parents[1] / "models" / "demo"


@pytest.fixture(scope="module")
def hf():
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEMO)


def test_is_small_bf16_and_documented():
    files = {p.name: p.stat().st_size for p in DEMO.iterdir()}
    assert sum(files.values()) <= 50 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "validation.txt" in files and "training.json" in files


def test_chat_template_is_the_test_checkpoints_tool_aware_one():
    # tests/serve/test_tools.py drives tool calling through llmbuild.testing's copy of the template
    assert (DEMO / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert "tools" in AutoTokenizer.from_pretrained(DEMO).chat_template


def test_held_out_perplexity_matches_the_training_report(hf):
    model, tok = hf
    report = json.loads((DEMO / "training.json").read_text())
    text = (DEMO / "validation.txt").read_text().split("\n\n")
    ids: list[int] = []
    for paragraph in text:
        ids += tok(paragraph)["input_ids"] + [tok.eos_token_id]
    seq = report["seq_len"]
    data = torch.tensor(ids[: (len(ids) - 1) // seq * seq + 1])
    x, y = data[:-1].view(-1, seq), data[1:].view(-1, seq)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
    ppl = math.exp(loss.item())
    # far better than chance (vocab 4096), and what training measured (bf16 rounding of the weights aside)
    assert ppl < 60
    assert ppl == pytest.approx(report["perplexity"]["validation"], rel=0.1)


def test_engine_generates_what_transformers_generates(hf, make_engine):
    model, tok = hf
    engine = make_engine("trained-demo", DEMO, model={"dtype": "float32"})
    llm = LLMEngine.from_dir(engine)
    prompts = ["A function is", "The list type", "Exceptions are raised when"]
    ours = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for prompt, done in zip(prompts, ours, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
        expected = ref[0, ids.shape[1] :].tolist()
        assert done.token_ids == expected, prompt
        assert done.text.strip(), prompt


def test_constrained_answers_follow_their_schema_over_many_seeds(make_engine):
    llm = LLMEngine.from_dir(make_engine("trained-demo", DEMO, model={"dtype": "float32"}))
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["list", "tuple", "dict", "set"]},
            "mutable": {"type": "boolean"},
            "methods": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["name", "kind", "mutable", "methods"],
        "additionalProperties": False,
    }
    for seed in range(8):
        params = SamplingParams(
            max_tokens=160, temperature=0.8, top_p=0.95, seed=seed, structured=Grammar.json_schema(schema)
        )
        (done,) = llm.generate(["A Python container described as JSON: "], params)
        assert done.finish_reason == "stop", done.text
        value = json.loads(done.text)
        assert set(value) == set(schema["properties"]) and value["kind"] in schema["properties"]["kind"]["enum"]
        assert isinstance(value["mutable"], bool) and len(value["methods"]) <= 3
        assert len(value["name"]) <= 20 and all(isinstance(m, str) and len(m) <= 12 for m in value["methods"])
