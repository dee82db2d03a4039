"""Structured output in the engine: every constrained answer follows its grammar, sampled or greedy, in
batches with free requests, with n > 1 and across preemption; bad grammars are one-line RequestErrors."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from llmbuild.errors import RequestError
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.structured_output import WARM_UP_GRAMMAR, Grammar
from tests.conftest import edit_json
from tests.helpers import PERSON


@pytest.fixture(scope="module")
def llm(llama_engine) -> LLMEngine:
    return LLMEngine.from_dir(llama_engine)


def check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age", "role"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert value["role"] in ("admin", "user", "guest")


def test_sampled_json_follows_the_schema_over_many_seeds(llm):
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=Grammar.json_schema(PERSON))
        for seed in range(12)
    ]
    requests = [llm.make_request([1, 2, 3, 4 + i], p) for i, p in enumerate(params)]
    free = llm.make_request([5, 6, 7], SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True))
    for r in [*requests, free]:
        llm.add_request(r)
    texts = {r.request_id: "" for r in [*requests, free]}
    while llm.has_unfinished():
        for out in llm.step():
            texts[out.request_id] += out.text
    for r in requests:
        assert r.finish_reason.value == "stop", texts[r.request_id]
        check_person(texts[r.request_id])
    assert len(free.output_token_ids) == 30  # the unconstrained request in the same batches is untouched
    assert llm.pool.num_free == llm.pool.num_blocks


@pytest.mark.parametrize(
    ("grammar", "pattern"),
    [
        (Grammar("regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
        (Grammar.choice(["red", "green", "blue"]), r"red|green|blue"),
        (Grammar("grammar", 'start: num ("+" num)*\nnum: /[0-9]{1,2}/'), r"[0-9]{1,2}(\+[0-9]{1,2})*"),
    ],
    ids=["regex", "choice", "lark"],
)
def test_regex_choice_and_lark(llm, grammar, pattern):
    for seed in range(6):
        (c,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=40, temperature=1.0, seed=seed, structured=grammar))
        assert re.fullmatch(pattern, c.text), c.text


def test_greedy_constrained_equals_the_best_allowed_token_each_step(llm):
    (c,) = llm.generate(
        [[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0, structured=Grammar.choice(["7", "8"]))
    )
    assert c.text in ("7", "8") and c.finish_reason == "stop"


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (Grammar.json_schema({"type": "strin"}), "json: .*strin"),
        (Grammar.json_schema("{not json"), "json: "),
        (Grammar("regex", "(unclosed"), "regex: .*regex"),
        (Grammar("grammar", "start: undefined_rule"), "grammar: "),
    ],
    ids=["bad-type", "bad-json", "bad-regex", "bad-lark"],
)
def test_bad_grammars_are_one_line_request_errors(llm, grammar, message):
    with pytest.raises(RequestError, match=message) as info:
        llm.make_request([1, 2], SamplingParams(structured=grammar))
    assert "\n" not in str(info.value)


def test_compiled_grammars_are_cached(llm):
    g = Grammar.json_schema({**PERSON, "title": "cached"})
    first = llm.grammars.matcher(g)
    assert llm.grammars.matcher(g) is not first  # a copy per request, from the cached compile
    assert g in llm.grammars._cache


def test_preempted_constrained_requests_resume_their_grammar(llama_engine, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(llama_engine, small)
    edit_json(small / "manifest.json", kv_cache__memory_bytes=40 * 16 * 512)  # too few blocks for 8 at once
    tight, roomy = LLMEngine.from_dir(small, enable_prefix_caching=False), LLMEngine.from_dir(llama_engine)
    digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 25, "maxItems": 25}
    params = SamplingParams(max_tokens=150, temperature=0, structured=Grammar.json_schema(digits))
    prompts = [roomy.tokenizer.encode(f"request {i} asks for digits " * (4 + i)) for i in range(8)]
    expected = [c.text for c in roomy.generate(prompts, params)]
    got = [c.text for c in tight.generate(prompts, params)]
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert all(len(json.loads(text)) == 25 for text in got)
    assert tight.pool.num_free == tight.pool.num_blocks


def test_a_tensor_parallel_engine_constrains_like_one_rank(llm, make_ckpt, make_engine):
    tp2 = make_engine("llama-eager-tp2", make_ckpt("llama"), target={"backend": "eager", "tensor_parallel": 2})
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=Grammar.json_schema(PERSON))
        for seed in (1, 2)
    ]
    expected = [llm.generate([p], sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    with LLMEngine.from_dir(tp2) as many:
        got = [many.generate([p], sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    assert got == expected
    for text in got:
        check_person(text)


def test_warm_up_prepares_what_json_object_compiles_to(llama_engine):
    llm = LLMEngine.from_dir(llama_engine)
    assert llm.grammars._tokenizer is None  # nothing is built at load
    llm.grammars.warm_up()
    assert llm.grammars._tokenizer is not None and WARM_UP_GRAMMAR in llm.grammars._cache
    assert WARM_UP_GRAMMAR == Grammar.json_schema({"type": "object"})  # response_format json_object's grammar
