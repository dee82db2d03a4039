"""LoRA adapters served as models of their own by a real server, through the `openai` client: listed with
their parent, addressed by `model`, mixed in one running batch, loaded and unloaded while serving."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import ALL_LORA_MODULES, greedy_tokens, make_peft_adapter, random_prompt
from tests.serve.conftest import API_KEY, Server, start_server

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(make_ckpt, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    ckpt, root = make_ckpt("llama"), tmp_path_factory.mktemp("served-adapters")
    configs = {
        "support-bot": dict(r=8, lora_alpha=32, target_modules=ALL_LORA_MODULES),
        "sql-writer": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "late-comer": dict(r=16, lora_alpha=32, target_modules=["o_proj", "up_proj"]),
        "too-big": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),
    }
    return {
        name: (root / name, make_peft_adapter(ckpt, root / name, 10 + i, **config))
        for i, (name, config) in enumerate(configs.items())
    }


@pytest.fixture(scope="module")
def lora_server(make_ckpt, make_engine, adapters, tmp_path_factory) -> Iterator[Server]:
    engine = make_engine("serve-lora", make_ckpt("llama"), lora={"max_loras": 2, "max_rank": 16})
    args = [f"--lora={name}={adapters[name][0]}" for name in ("support-bot", "sql-writer")]
    s = start_server(engine, tmp_path_factory.mktemp("lora-server") / "server.log", *args, "--allow-adapter-loading")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture
def client(lora_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_server.base, api_key=API_KEY, max_retries=0, timeout=120)


def expected_text(make_ckpt, model: torch.nn.Module, prompt: list[int]) -> str:
    """The text of the oracle's greedy tokens (a trailing incomplete UTF-8 sequence dropped, as the server's
    detokenizer drops it)."""
    tokenizer = AutoTokenizer.from_pretrained(make_ckpt("llama"))
    return tokenizer.decode(greedy_tokens(model, prompt, NEW_TOKENS), skip_special_tokens=True).rstrip("\ufffd")


def complete(client: openai.OpenAI, model: str, prompt: list[int]) -> str:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text.rstrip("\ufffd")


def test_models_lists_the_base_then_each_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["serve-lora", "sql-writer", "support-bot"]
    assert models["serve-lora"].parent is None
    assert models["support-bot"].parent == "serve-lora" and models["support-bot"].root.endswith("support-bot")
    assert client.models.retrieve("sql-writer").parent == "serve-lora"


def test_concurrent_requests_for_the_base_and_each_adapter_get_each_ones_own_tokens(client, adapters, make_ckpt):
    base = AutoModelForCausalLM.from_pretrained(make_ckpt("llama"), dtype=torch.float32).eval()
    oracles = {"serve-lora": base, "support-bot": adapters["support-bot"][1], "sql-writer": adapters["sql-writer"][1]}
    cases = [(model, random_prompt(10 + i, 70 + i)) for i, model in enumerate(list(oracles) * 2)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(lambda case: complete(client, *case), cases))
    for (model, prompt), text in zip(cases, texts, strict=True):
        assert text == expected_text(make_ckpt, oracles[model], prompt), model


def test_chat_takes_an_adapter_too_and_metrics_show_the_slots(lora_server, client):
    answer = client.chat.completions.create(
        model="sql-writer", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert answer.model == "sql-writer" and answer.choices[0].message.content is not None
    chunks = list(
        client.chat.completions.create(
            model="sql-writer", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks and {c.model for c in chunks} == {"sql-writer"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert lora_server.metric("llmbuild_lora_adapters") == 2
    assert lora_server.metric("llmbuild_lora_slots_used") == 2
    assert lora_server.metric("llmbuild_lora_slot_loads_total") >= 2


def test_an_unknown_model_is_a_404_naming_what_is_served(client):
    with pytest.raises(openai.NotFoundError, match="'serve-lora', 'sql-writer', 'support-bot'"):
        complete(client, "no-such-adapter", [5, 6, 7])


def test_adapters_load_and_unload_while_serving_and_a_bad_one_changes_nothing(lora_server, client, adapters, make_ckpt):
    http = lora_server.client()
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "too-big", "lora_path": str(adapters["too-big"][0])})
    assert bad.status_code == 400 and "rank 32" in bad.json()["error"]["message"]
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert missing.status_code == 400
    ok = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "late-comer", "lora_path": str(adapters["late-comer"][0])}
    )
    assert ok.status_code == 200, ok.text
    assert "late-comer" in [m.id for m in client.models.list().data]
    prompt = random_prompt(12, 90)
    # a third adapter with two slots: it takes the least recently used one
    assert complete(client, "late-comer", prompt) == expected_text(make_ckpt, adapters["late-comer"][1], prompt)
    assert complete(client, "support-bot", prompt) == expected_text(make_ckpt, adapters["support-bot"][1], prompt)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late-comer"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "late-comer", prompt)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late-comer"}).status_code == 404
    unauthorized = lora_server.client(key=None).post("/v1/unload_lora_adapter", json={"lora_name": "sql-writer"})
    assert unauthorized.status_code == 401


def test_a_bad_adapter_on_the_command_line_stops_the_server_with_one_line(make_ckpt, make_engine, adapters):
    engine = make_engine("serve-lora", make_ckpt("llama"), lora={"max_loras": 2, "max_rank": 16})
    done = subprocess.run(
        [sys.executable, "-m", "llmbuild.cli", "serve", str(engine), f"--lora=big={adapters['too-big'][0]}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "rank 32" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
