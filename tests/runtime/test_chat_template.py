"""apply_chat_template with a real (tiny, trained) tokenizer and its ChatML template (which renders tools)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmbuild.runtime.chat_template import (
    ChatTemplateError,
    NoChatTemplateError,
    NoToolTemplateError,
    apply_chat_template,
    renders_tools,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
TOOL = {"type": "function", "function": {"name": "paint", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "paint", "arguments": {"colour": "red"}}}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_ids_are_the_rendered_template_tokenized(tokenizer):
    ids = apply_chat_template(tokenizer, MESSAGES)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
    assert tokenizer.decode(ids) == text + "<|im_start|>assistant\n"
    assert tokenizer.decode(apply_chat_template(tokenizer, MESSAGES, add_generation_prompt=False)) == text


def test_no_template_is_its_own_error(tokenizer_dir):
    bare = AutoTokenizer.from_pretrained(tokenizer_dir)
    bare.chat_template = None
    with pytest.raises(NoChatTemplateError, match="this engine's tokenizer has no chat template"):
        apply_chat_template(bare, MESSAGES)


def test_a_template_error_keeps_the_templates_message(tokenizer_dir):
    strict = AutoTokenizer.from_pretrained(tokenizer_dir)
    strict.chat_template = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(ChatTemplateError, match="^only user turns, please$"):
        apply_chat_template(strict, MESSAGES)


def test_tools_render_in_the_system_turn_and_calls_and_results_as_blocks(tokenizer):
    history = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    text = tokenizer.decode(apply_chat_template(tokenizer, history, tools=[TOOL]))
    assert renders_tools(tokenizer)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert (
        '<tools>\n{"type": "function", "function": {"name": "paint", "parameters": {"type": "object"}}}\n</tools>'
        in text
    )
    assert text.count("<|im_start|>system") == 1  # the system message joins the tools' turn
    block = '<tool_call>\n{"name": "paint", "arguments": {"colour": "red"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{block}\n{block}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>tool\n<tool_response>\ndone\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_never_mentions_tools_refuses_them(tokenizer_dir):
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not renders_tools(plain)
    with pytest.raises(NoToolTemplateError, match="cannot render tools"):
        apply_chat_template(plain, MESSAGES, tools=[TOOL])
    with pytest.raises(NoToolTemplateError):
        apply_chat_template(plain, [{"role": "assistant", "content": "", "tool_calls": [CALL]}])
    assert plain.decode(apply_chat_template(plain, MESSAGES)) == "Be brief.Name a colour."
