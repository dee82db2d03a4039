"""Tool calling through the real `openai` client: tool_choice required and named (non-streamed and
streamed) always answer with calls of listed functions whose arguments validate; history tool calls and
results render through the template; auto's answers are read for <tool_call> blocks; bad tools are 400s
naming the field, and a template that cannot render tools refuses them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from llmbuild.serve.tools import ToolCallParser, message_with_calls
from tests.serve.conftest import API_KEY

DEMO = Path(__file__).parents[2] / "models" / "demo"


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    city: Literal["Paris", "Oslo", "Rome"]
    days: int = Field(ge=1, le=7)


class TimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    zone: str = Field(max_length=6)


ARGS: dict[str, type[BaseModel]] = {"get_weather": WeatherArgs, "get_time": TimeArgs}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for some days",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo", "Rome"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 6}},
                "required": ["zone"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def client(tools_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tools_server.base, api_key=API_KEY, max_retries=0, timeout=120)


def assert_valid_calls(calls, names: frozenset[str] = frozenset(ARGS)) -> list[tuple[str, dict]]:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        ARGS[call.function.name].model_validate_json(call.function.arguments)
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def streamed_calls(stream) -> tuple[str, list[dict], str | None]:
    """The content, the tool calls (assembled from their deltas) and the last finish reason of a stream."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parallel", [True, False])
def test_required_answers_are_valid_calls_over_many_seeds(client, parallel):
    for seed in range(6):
        r = client.chat.completions.create(
            model="tools",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=400,
            temperature=1.0,
            seed=seed,
        )
        choice = r.choices[0]
        calls = assert_valid_calls(choice.message.tool_calls)
        if not parallel:
            assert len(calls) == 1 and choice.finish_reason == "tool_calls"
        # parallel calls may go on to max_tokens; the complete ones are calls all the same
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            assert choice.message.content is None


def test_a_named_function_is_the_one_called(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model="tools",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert [name for name, _ in assert_valid_calls(r.choices[0].message.tool_calls, {"get_time"})] == ["get_time"]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_streamed_calls_are_deltas_of_the_same_calls(client, tool_choice):
    for seed in range(3):
        request = dict(
            model="tools",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        whole = client.chat.completions.create(**request)
        content, calls, finish = streamed_calls(client.chat.completions.create(stream=True, **request))
        assert content == "" and finish == "tool_calls"
        assert [c["id"].startswith("call_") for c in calls] == [True]
        expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert [(c["name"], c["arguments"]) for c in calls] == expected


def test_history_with_calls_and_results_renders_through_the_template(tools_server, client):
    with tools_server.client() as c:
        r = c.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS})
        assert r.status_code == 200, r.text
        prompt = c.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
        plain = c.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[1]) in prompt and '<tool_call>\n{"name": <function-name>' in prompt
    call = '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    assert call + "\n</tool_call><|im_end|>\n" in prompt
    assert prompt.endswith(
        "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(plain) < r.json()["count"]
    answer = client.chat.completions.create(model="tools", messages=HISTORY, tools=TOOLS, max_tokens=30, seed=0)
    assert answer.usage.prompt_tokens == r.json()["count"]
    message, finish = answer.choices[0].message, answer.choices[0].finish_reason
    if message.tool_calls:  # a random model rarely writes a block; when it does, it is read as a call
        assert_valid_calls(message.tool_calls)
        assert finish == "tool_calls"
    else:
        assert isinstance(message.content, str) and finish in ("stop", "length")


def test_tool_choice_none_renders_the_tools_and_reads_no_calls(client):
    r = client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=5, seed=0
    )
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 300


AUTO_TEXT = (
    'Let me check. \n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n <tool_c'
)


@pytest.mark.parametrize("piece", [1, 2, 5, len(AUTO_TEXT)])
def test_auto_answers_are_read_for_listed_calls_in_any_pieces(piece):
    whole = message_with_calls(ToolCallParser(frozenset(ARGS), parallel=True), AUTO_TEXT)
    assert whole["content"] == 'Let me check.<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call><tool_c'
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == [
        ("get_weather", {"city": "Oslo", "days": 1}),
        ("get_time", {"zone": "UTC"}),
    ]
    parser = ToolCallParser(frozenset(ARGS), parallel=True)
    content, calls = "", []
    for i in range(0, len(AUTO_TEXT), piece):
        text, new = parser.feed(AUTO_TEXT[i : i + piece])
        assert '<tool_call>\n{"name": "get' not in text  # a call's text is never content
        content, calls = content + text, calls + new
    assert content + parser.finish() == whole["content"]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"] for c in calls] == [c["function"] for c in whole["tool_calls"]]


def test_auto_without_parallel_calls_keeps_the_first_and_plain_text_stays_as_it_was():
    one = message_with_calls(ToolCallParser(frozenset(ARGS), parallel=False), AUTO_TEXT)
    assert [c["function"]["name"] for c in one["tool_calls"]] == ["get_weather"]
    text = "no calls here <tool_call> {broken\n"
    assert message_with_calls(ToolCallParser(frozenset(ARGS), parallel=True), text) == {
        "role": "assistant",
        "content": text,
    }


def bad_tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"tools": [bad_tool("get weather")]}, "tools.0.function.name", "pattern"),
        ({"tools": [bad_tool("x" * 65)]}, "tools.0.function.name", "pattern"),
        ({"tools": [bad_tool("f"), bad_tool("f")]}, "tools", "'f' appears more than once"),
        ({"tools": [bad_tool(f"f{i}") for i in range(129)]}, "tools", "at most 128"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools.0.type", "function"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope' is not among tools (get_weather, get_time)",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be none, auto, required"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            },
            "tools",
            "one output constraint, not tools and response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": {"type": "strin"}}}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
            "strin",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": 1}, "parallel_tool_calls", "boolean"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.0.function.parameters",
            "JSON schema of an object",
        ),
    ],
    ids=[
        "space",
        "long",
        "duplicate",
        "too-many",
        "not-function",
        "unknown-choice",
        "bad-mode",
        "no-tools",
        "two-constraints",
        "bad-schema",
        "parallel-type",
        "not-object",
    ],
)
def test_bad_tools_are_400_naming_the_field(tools_server, fields, param, message):
    with tools_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}],
                }
            ],
            "messages.0.tool_calls.0.function.arguments",
            "JSON object",
        ),
        (
            [{"role": "user", "content": "hi", "tool_calls": []}],
            "messages.0",
            "only assistant messages",
        ),
    ],
    ids=["arguments-not-json", "calls-on-user"],
)
def test_bad_history_tool_calls_are_400_naming_the_message(tools_server, messages, param, message):
    with tools_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_a_template_that_never_mentions_tools_refuses_them(app_client):
    # the fake engine's template ("role: content") has no tool support
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app_client, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat template cannot render tools") as info:
        client.chat.completions.create(model="fake", messages=MESSAGES, tools=TOOLS, max_tokens=2)
    assert info.value.body["param"] == "tools"
    r = app_client.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = app_client.post("/v1/chat/completions", json={"messages": HISTORY[1:3], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_strict_functions_under_auto_allow_text_or_calls_whose_arguments_match():
    """The grammar of auto with a strict function, compiled as the server compiles it: any text without the
    opening tag, or calls whose arguments match."""
    from transformers import AutoTokenizer

    from llmbuild.runtime.structured_output import GrammarCompiler
    from llmbuild.serve.tools import Tool, tool_grammar

    demo = AutoTokenizer.from_pretrained(DEMO)
    tools = [Tool.model_validate(t) for t in TOOLS]
    matcher = GrammarCompiler(demo, len(demo)).matcher(tool_grammar(tools, None, parallel=True, free_text=True))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'

    def consumed(text: str) -> tuple[int, int, bool]:
        matcher.reset()
        ids = demo.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids), len(ids), matcher.is_accepting()

    for answer in ("It is sunny in Oslo, no call needed.", call, call + "\n" + call):
        taken, total, done = consumed(answer)
        assert taken == total and done, answer
    for wrong in (
        call.replace('"days": 3', '"days": 9'),  # out of the schema's range
        call.replace("get_weather", "get_wether"),  # no such function
        "Sure: <tool_call>\nnot json",  # the tag commits to a call
        "Let me look.\n" + call,  # text or calls, not both (see tool_grammar)
    ):
        taken, total, _ = consumed(wrong)
        assert taken < total, wrong


def test_auto_with_a_strict_function_answers_text_or_valid_calls(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model="tools", messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=1.0, seed=seed
        )
        message = r.choices[0].message
        assert "<tool_call>" not in (message.content or "")
        if message.tool_calls:
            assert_valid_calls(message.tool_calls)
    # an explicit response_format takes precedence over the tools' grammar (one constraint per request)
    r = client.chat.completions.create(
        model="tools",
        messages=MESSAGES,
        tools=TOOLS,
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0.0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_recursive_parameters_refer_to_themselves_inside_the_call():
    """`$ref: "#"` in a function's parameters means the parameters, not the call object around them."""
    from transformers import AutoTokenizer

    from llmbuild.runtime.structured_output import GrammarCompiler
    from llmbuild.serve.tools import Tool, tool_grammar

    tree = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "maxLength": 4},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["label"],
        "additionalProperties": False,
    }
    tool = Tool.model_validate({"type": "function", "function": {"name": "plant", "parameters": tree}})
    demo = AutoTokenizer.from_pretrained(DEMO)
    matcher = GrammarCompiler(demo, len(demo)).matcher(tool_grammar([tool], None, parallel=False))
    nested = '{"label": "a", "children": [{"label": "b", "children": []}]}'
    ids = demo.encode(
        f'<tool_call>\n{{"name": "plant", "arguments": {nested}}}\n</tool_call>', add_special_tokens=False
    )
    assert matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
    matcher.reset()
    wrong = '{"label": "a", "children": [{"name": "plant", "arguments": {}}]}'  # what "#" as the call would allow
    ids = demo.encode(f'<tool_call>\n{{"name": "plant", "arguments": {wrong}}}\n</tool_call>', add_special_tokens=False)
    assert matcher.try_consume_tokens(ids) < len(ids)
