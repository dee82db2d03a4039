"""Structured output through the real `openai` client: response_format (json_object, json_schema,
`chat.completions.parse` with a pydantic model), vLLM's structured_outputs and guided_* fields,
streaming; bad and pathological grammars are 400s in bounded time while other requests keep streaming."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers import PERSON
from tests.serve.conftest import API_KEY

MESSAGES = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120)


def test_json_schema_answers_validate_over_many_seeds(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(8):
        r = client.chat.completions.create(
            model="serve", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed, response_format=fmt
        )
        assert r.choices[0].finish_reason == "stop"
        Person.model_validate_json(r.choices[0].message.content)


def test_parse_with_a_pydantic_model(client):
    for seed in range(4):
        r = client.chat.completions.parse(
            model="serve", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed, response_format=Person
        )
        assert isinstance(r.choices[0].message.parsed, Person)


def test_json_object_on_completions_with_n_and_streaming(client):
    r = client.completions.create(
        model="serve",
        prompt="JSON:",
        max_tokens=200,
        temperature=1.0,
        seed=3,
        n=3,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
    stream = client.chat.completions.create(
        model="serve",
        messages=MESSAGES,
        max_tokens=120,
        temperature=1.0,
        seed=1,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    Person.model_validate_json("".join(c.choices[0].delta.content or "" for c in stream if c.choices))


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}, r"[0-9]{3}-[0-9]{4}"),
        ({"structured_outputs": {"choice": ["alpha", "beta"]}}, r"alpha|beta"),
        ({"structured_outputs": {"grammar": 'start: "x" ("," "x")*'}}, r"x(,x)*"),
        ({"guided_choice": ["up", "down"]}, r"up|down"),
        ({"guided_regex": "[a-c]{5}"}, r"[a-c]{5}"),
    ],
    ids=["regex", "choice", "lark", "guided_choice", "guided_regex"],
)
def test_vllm_structured_outputs(client, extra, pattern):
    for seed in range(3):
        r = client.completions.create(
            model="serve", prompt="Answer:", max_tokens=40, temperature=1.0, seed=seed, extra_body=extra
        )
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
            "strin",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format", "one output constraint"),
        ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "guided_grammar"),
    ],
    ids=["bad-schema", "bad-regex", "two-in-one", "two-fields", "bad-lark"],
)
def test_bad_constraints_are_400_naming_the_field(server, body, param, message):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and message in r.json()["error"]["message"]


PATHOLOGICAL = {
    "deep nesting": {"guided_json": json.loads('{"type": "object", "properties": {"a": ' * 100 + "{}" + "}}" * 100)},
    "huge enum": {"guided_json": {"enum": [f"value-{i}" for i in range(10_000)]}},
    "catastrophic regex": {"guided_regex": "(a|aa)*(x+x+)+y"},
    "giant lark": {"guided_grammar": "start: " + " | ".join(f'"w{i}"' for i in range(50_000))},
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_grammars_end_in_bounded_time_while_a_stream_keeps_going(server, client, name):
    times: list[float] = []

    def stream() -> None:
        for _ in client.completions.create(
            model="serve", prompt="hello", max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}
        ):
            times.append(time.monotonic())

    worker = threading.Thread(target=stream)
    worker.start()
    start = time.monotonic()
    with server.client(timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, **PATHOLOGICAL[name]})
    elapsed = time.monotonic() - start
    worker.join(timeout=120)
    assert r.status_code in (200, 400), r.text
    assert elapsed < 30, f"{name}: {elapsed:.1f} s"
    assert len(times) >= 40  # the other request streamed to its end
    with server.client() as c:
        assert c.get("/health").status_code == 200
