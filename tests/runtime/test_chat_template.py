"""apply_chat_template with a real (tiny, trained) tokenizer and its ChatML template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmbuild.runtime.chat_template import ChatTemplateError, NoChatTemplateError, apply_chat_template

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


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
