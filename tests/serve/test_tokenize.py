"""/tokenize and /detokenize on a real server, against the engine's own tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

TEXT = "The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tok(serve_engine):
    return AutoTokenizer.from_pretrained(serve_engine / "tokenizer")


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.mark.parametrize("special", [True, False, None], ids=["special", "plain", "default"])
def test_tokenize_a_prompt(http, tok, special):
    body = {"model": "serve", "prompt": TEXT} | ({} if special is None else {"add_special_tokens": special})
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    expected = tok.encode(TEXT, add_special_tokens=special is not False)
    assert r.json() == {"tokens": expected, "count": len(expected), "max_model_len": 256}
    assert (expected[0] == tok.bos_token_id) == (special is not False)


def test_tokenize_token_strings(http, tok):
    r = http.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True})
    out = r.json()
    assert out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"]) and out["token_strs"][0] == "<s>"


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_tokenize_chat_messages_as_the_chat_route_sees_them(http, tok, generation_prompt):
    r = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": generation_prompt})
    assert r.status_code == 200, r.text
    expected = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    assert r.json()["tokens"] == list(expected) and r.json()["count"] == len(expected)
    chat = http.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 1, "add_generation_prompt": generation_prompt},
    )
    assert chat.json()["usage"]["prompt_tokens"] == r.json()["count"]


def test_detokenize_round_trips(http, tok):
    ids = http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
    r = http.post("/detokenize", json={"model": "serve", "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": TEXT}
    with_bos = http.post("/detokenize", json={"tokens": [tok.bos_token_id, *ids]}).json()["prompt"]
    assert with_bos == tok.decode([tok.bos_token_id, *ids])


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([5, 512], "tokens.1: token id 512 is out of range [0, 512)"),
        ([-1], "tokens.0: token id -1 is out of range [0, 512)"),
        ([5, "6"], "tokens.1:"),
        ("5 6", "tokens:"),
    ],
)
def test_detokenize_refuses_ids_outside_the_vocabulary(http, tokens, message):
    r = http.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(message) and err["param"].startswith("tokens")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": TEXT, "model": "gpt-4"}, 404, "model 'gpt-4' does not exist; this server serves 'serve'"),
        ({"prompt": TEXT, "messages": MESSAGES}, 400, "give either prompt (text) or messages (chat)"),
        ({}, 400, "give either prompt (text) or messages (chat)"),
        ({"prompt": 42}, 400, "prompt:"),
        ({"prompt": TEXT, "add_special_tokens": "yes"}, 400, "add_special_tokens:"),
        ({"messages": MESSAGES, "add_special_tokens": True}, 400, "add_special_tokens: true is not supported"),
    ],
)
def test_tokenize_refusals_name_the_field(http, body, status, message):
    r = http.post("/tokenize", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"].startswith(message)


def test_unknown_tokenize_fields_are_ignored_and_named(http):
    r = http.post("/tokenize", json={"prompt": TEXT, "chat_template_kwargs": {}})
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "chat_template_kwargs"
    assert "x-ignored-fields" not in http.post("/tokenize", json={"prompt": TEXT}).headers


def test_both_routes_need_the_key(server):
    with server.client(key=None) as anon:
        assert anon.post("/tokenize", json={"prompt": TEXT}).status_code == 401
        assert anon.post("/detokenize", json={"tokens": [5]}).status_code == 401
