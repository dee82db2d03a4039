"""Chat prompts: messages through the engine tokenizer's own chat template, to prompt token ids.

Shared by `llmbuild run --chat` and the server's /v1/chat/completions, so both send the model the
same tokens for the same conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmbuild.errors import RequestError


class NoChatTemplateError(RequestError):
    """The engine's tokenizer carries no chat template (a base model); callers say what to use instead."""


class ChatTemplateError(RequestError):
    """The chat template refused the messages (templates raise what their authors chose)."""


class NoToolTemplateError(RequestError):
    """Tools or tool calls for a chat template that cannot render them (it never mentions `tools`)."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` (a transformers tokenizer) carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools: whether it mentions `tools` at all.

    Templates that support tool calling read HF's `tools` variable; one that never names it would drop
    the tools silently, and the model could not know what to call.
    """
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Prompt token ids of `messages` ({"role", "content"} each, assistant `tool_calls` and tool
    `tool_call_id` when given) under the tokenizer's chat template, with `tools` (OpenAI tool objects,
    as HF's apply_chat_template takes them) when given.

    With add_generation_prompt the ids end with the template's opening of an assistant turn.
    Raises NoChatTemplateError when the tokenizer has no template, NoToolTemplateError for tools or tool
    calls the template cannot render, ChatTemplateError (whose message is the template's own) when the
    template refuses the messages.
    """
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError("this engine's tokenizer has no chat template")
    if (tools or any(m.get("tool_calls") for m in messages)) and not renders_tools(tokenizer):
        raise NoToolTemplateError("this engine's chat template cannot render tools (it never mentions `tools`)")
    extra = {"tools": [dict(t) for t in tools]} if tools else {}
    try:
        ids = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            **extra,
        )
    except Exception as exc:  # noqa: BLE001 - templates raise what their authors chose (jinja2 errors)
        raise ChatTemplateError(str(exc)) from exc
    return list(ids)
