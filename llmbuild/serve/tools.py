"""Tool calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and history tool calls; the
grammar that makes a `required` or named-function answer a call; the answer's calls parsed out.

The format is Hermes / Qwen2.5's, which the demo chat template renders: a call is a block
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant's text. Under
`tool_choice: auto` the model writes freely and every complete block that names a listed function with
an object of arguments becomes a call (anything else stays content); under `required` or a named
function a grammar (Lark with the calls' JSON schemas embedded, compiled like any other constraint)
makes the text one call, or several with `parallel_tool_calls`, whose arguments match the schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from llmbuild.runtime.structured_output import JSON_LAYOUT, Grammar
from llmbuild.serve.request_model import RequestModel

MAX_TOOLS = 128
"""Tools in one request: each becomes part of the prompt and, when constrained, of the grammar."""
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MODES = ("none", "auto", "required")
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
_MOVED_KEYS = ("$defs", "definitions")
"""Schema keys `#/...` references point into: kept at the root of a call's schema, where they still resolve."""


class FunctionSpec(RequestModel):
    name: str = Field(pattern=_NAME)
    """1 to 64 letters, digits, underscores or dashes (OpenAI's rule)."""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema (None: any object)."""
    strict: bool | None = None
    """Accepted; arguments are always held to the schema when the grammar applies (required, named)."""

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError(
                f"must be the JSON schema of an object (arguments are one), not type {parameters['type']!r}"
            )
        return parameters


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionSpec

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates take it (HF's `tools`): the OpenAI object, unset fields left out."""
        return self.model_dump(exclude_none=True, exclude_unset=True)


class CalledFunction(RequestModel):
    name: str
    arguments: str
    """A JSON object as text, as OpenAI sends it."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object as text, such as \'{"city": "Paris"}\'')
        return arguments


class ToolCall(RequestModel):
    """A call an earlier assistant message made (chat history)."""

    id: str
    type: Literal["function"]
    function: CalledFunction

    def for_template(self) -> dict[str, Any]:
        """The call as HF chat templates take it: the arguments as an object, not text."""
        function = {"name": self.function.name, "arguments": json.loads(self.function.arguments)}
        return {"id": self.id, "type": "function", "function": function}


def check_tool_choice(choice: str | dict[str, Any] | None) -> None:
    """ValueError unless `choice` is a mode or {"type": "function", "function": {"name": ...}}."""
    if choice is None or choice in MODES:
        return
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise ValueError(
            f"must be none, auto, required or {{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}"
        )


def chosen_function(choice: str | dict[str, Any] | None) -> str | None:
    """The function a (checked) tool_choice names; None for a mode."""
    return choice["function"]["name"] if isinstance(choice, dict) else None


def check_tools(tools: list[Tool], choice: str | dict[str, Any] | None) -> None:
    """ValueError (naming the field first) for duplicate names, or a tool_choice that needs tools or names
    none of them."""
    names = [t.function.name for t in tools]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ValueError(f"tools: function name {twice!r} appears more than once; names must be unique")
    if choice not in (None, "none", "auto") and not tools:
        raise ValueError(f"tool_choice {choice!r} needs tools")
    named = chosen_function(choice)
    if named is not None and named not in names:
        raise ValueError(f"tool_choice: function {named!r} is not among tools ({', '.join(names)})")


def tool_grammar(tools: list[Tool], only: str | None, parallel: bool, free_text: bool = False) -> Grammar:
    """The Lark grammar of an answer that is one call (several with `parallel`) of the tools (or only
    the one named `only`), each a <tool_call> block of JSON whose arguments match the function's schema.
    With `free_text` (tool_choice auto with strict functions) the answer may instead be text without a
    <tool_call> block.

    One %json rule per function: each is a schema root, so the function's `$defs` stay where its
    references find them.
    """
    chosen = [t.function for t in tools if only is None or t.function.name == only]
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(f))}" for i, f in enumerate(chosen)]
    calls = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    answer = 'call ("\\n" call)*' if parallel else "call"
    start = f"start: {answer}"
    if free_text:
        # llguidance's lexeme algebra: any text that does not contain the opening tag. Text or calls, not
        # both: its lexer is greedy, so free text cannot end right before a tag it could still extend
        start = f"start: TEXT | {answer}\nTEXT: /(?s:.+)/ & ~/(?s:.*{CALL_OPEN}.*)/"
    call = f'call: "{CALL_OPEN}\\n" ({calls}) "\\n{CALL_CLOSE}"'
    return Grammar("grammar", "\n".join([start, call, *rules]))


def _call_schema(function: FunctionSpec) -> dict[str, Any]:
    """{"name": the function's, "arguments": its parameters}, laid out as json.dumps writes JSON."""
    parameters = _rebased(dict(function.parameters)) if function.parameters is not None else {"type": "object"}
    moved = {key: parameters.pop(key) for key in _MOVED_KEYS if key in parameters}
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **moved,
        "x-guidance": dict(JSON_LAYOUT),
    }


def _rebased(node: Any) -> Any:
    """The parameters schema with its references to itself (`#`, `#/properties/...`) pointed at where it sits
    in the call's schema (`#/properties/arguments...`); `#/$defs/...` stays: $defs move to the root."""
    if isinstance(node, list):
        return [_rebased(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rebased(value) for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        first = ref[2:].split("/", 1)[0]
        if first not in _MOVED_KEYS:
            out["$ref"] = "#/properties/arguments" + ref[1:]
    return out


@dataclass(frozen=True, slots=True)
class ToolCalling:
    """How a request's answers are read for calls: the functions it may call, and how many at once."""

    names: frozenset[str]
    parallel: bool

    def parser(self) -> ToolCallParser:
        """A fresh parser for one choice."""
        return ToolCallParser(self.names, self.parallel)


@dataclass
class ToolCallParser:
    """One choice's text, read as it streams: content to show, and calls as their blocks complete.

    Text from an opening <tool_call> on is held back until its block closes (or the text ends).
    Whitespace around calls is not content. Feeding the text in any pieces gives the same content and
    calls as feeding it whole.
    """

    names: frozenset[str]
    parallel: bool
    calls: list[dict[str, Any]] = field(default_factory=list)
    _held: str = ""
    _space: str = ""
    """Whitespace at the end of the content so far: shown only if more content follows."""
    _after_call: bool = False
    """Nothing but whitespace since the last call: the next content starts at its first non-space."""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The content `text` completes, and the calls it completes."""
        buffer, content, new = self._held + text, [], []
        while True:
            start = buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_open(buffer)
                content.append(self._content(buffer[: len(buffer) - keep]))
                self._held = buffer[len(buffer) - keep :]
                break
            content.append(self._content(buffer[:start]))
            end = buffer.find(CALL_CLOSE, start)
            if end < 0:
                self._held = buffer[start:]
                break
            block, buffer = buffer[start : end + len(CALL_CLOSE)], buffer[end + len(CALL_CLOSE) :]
            call = self._call(block)
            if call is None:
                content.append(self._content(block))
            else:
                new.append(call)
        return "".join(content), new

    def finish(self) -> str:
        """At the end of the text: what was held back (an unclosed block), as content."""
        held, self._held = self._held, ""
        tail = self._content(held)
        return tail if self.calls else tail + self._space

    def _content(self, text: str) -> str:
        if not text:
            return ""
        if self._after_call:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._space += text
            return ""
        self._after_call = False
        out, self._space = self._space + body, text[len(body) :]
        return out

    def _call(self, block: str) -> dict[str, Any] | None:
        """The OpenAI tool call a complete block makes (with its index), or None if it makes none."""
        if self.calls and not self.parallel:
            return None
        try:
            value = json.loads(block[len(CALL_OPEN) : -len(CALL_CLOSE)])
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        call = {
            "index": len(self.calls),
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        self.calls.append(call)
        self._space, self._after_call = "", True
        return call


def message_with_calls(parser: ToolCallParser, text: str) -> dict[str, Any]:
    """The assistant message of a whole choice's text: plain, or its calls with the content outside their
    blocks (null when there is none)."""
    content, calls = parser.feed(text)
    content += parser.finish()
    if not calls:
        return {"role": "assistant", "content": text}
    tool_calls = [{key: value for key, value in call.items() if key != "index"} for call in calls]
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}


def _partial_open(text: str) -> int:
    """Characters at the end of `text` that could begin CALL_OPEN (held back until the next piece)."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
