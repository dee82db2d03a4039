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


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` (a transformers tokenizer) carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Prompt token ids of `messages` ({"role", "content"} each) under the tokenizer's chat template.

    With add_generation_prompt the ids end with the template's opening of an assistant turn.
    Raises NoChatTemplateError when the tokenizer has no template, ChatTemplateError (whose message
    is the template's own) when the template refuses the messages.
    """
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError("this engine's tokenizer has no chat template")
    try:
        ids = tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except Exception as exc:  # noqa: BLE001 - templates raise what their authors chose (jinja2 errors)
        raise ChatTemplateError(str(exc)) from exc
    return list(ids)
