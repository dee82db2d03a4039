"""Structured-output request fields: OpenAI's `response_format` and vLLM's `structured_outputs` (and its
older `guided_*` fields, which LangChain's and other vLLM clients still send), resolved to one Grammar."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llmbuild.runtime.structured_output import Grammar
from llmbuild.serve.request_model import RequestModel


class JsonSchemaFormat(RequestModel):
    name: str = Field(max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(RequestModel):
    """OpenAI's response_format: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object {name, schema}")
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.json_schema({"type": "object"})
        if self.type == "json_schema" and self.json_schema is not None:
            return Grammar.json_schema(self.json_schema.schema_ or {})
        return None


class StructuredOutputs(RequestModel):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (Lark) or
    json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def to_grammar(self) -> Grammar:
        if self.json_ is not None:
            return Grammar.json_schema(self.json_)
        if self.regex is not None:
            return Grammar("regex", self.regex)
        if self.choice is not None:
            return Grammar.choice(self.choice)
        if self.grammar is not None:
            return Grammar("grammar", self.grammar)
        return Grammar.json_schema({"type": "object"})
