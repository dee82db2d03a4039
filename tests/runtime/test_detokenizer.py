"""Incremental detokenization against the tokenizer's own decode of the whole sequence."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from llmbuild.runtime.detokenizer import IncrementalDetokenizer

TEXT = "Naïve café — 東京 🚀 résumé: ÷ ±. Done"


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def test_deltas_concatenate_to_full_decode_and_never_split_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    # the tiny vocabulary has no merges for these characters: they arrive one byte-token at a time
    assert len(ids) > len(TEXT)
    prompt = tok.encode("Hello", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.update(t) for t in ids]
    final = d.flush()
    assert "".join(deltas) + final == tok.decode(ids) == TEXT
    assert all("\ufffd" not in piece for piece in deltas)
    assert deltas.count("") > 0  # some tokens only completed part of a character


def test_stop_string_across_tokens_truncates_and_is_never_emitted(tok):
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, [], stop=("STOP",))
    emitted = ""
    for t in ids:
        emitted += d.update(t)
        if d.stopped_by:
            break
    emitted += d.flush()
    assert d.stopped_by == "STOP"
    assert emitted == d.text == "alpha beta "


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("one two three", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, [], stop=("three", "two"))
    for t in ids:
        d.update(t)
    assert d.stopped_by == "two" and d.text == "one "


def test_text_that_might_start_a_stop_string_is_held_back(tok):
    ids = tok.encode("abc ST", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, [], stop=("STOP",))
    emitted = "".join(d.update(t) for t in ids)
    assert not emitted.endswith("ST")
    assert emitted + d.flush() == "abc ST"


def test_ids_beyond_the_tokenizer_are_skipped(tok):
    d = IncrementalDetokenizer(tok, [])
    assert d.update(tok.get_vocab_size() + 5) == ""


def test_a_prompt_ending_in_undecodable_bytes_does_not_leak_into_the_output(tok):
    # token ids of single bytes that are no UTF-8 character ("\xe6\x9d" is 2 of the 3 bytes of a CJK char)
    tail = tok.encode("東", add_special_tokens=False).ids[:-1]
    assert tok.decode(tail).endswith("\ufffd")
    prompt = tok.encode("some prompt ", add_special_tokens=False).ids + tail
    out = tok.encode("[1, 2]", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, prompt)
    assert "".join(d.update(t) for t in out) + d.flush() == "[1, 2]"
