"""Abuse and load through raw HTTP (httpx): the server answers every bad request with a 4xx and
keeps serving everyone else; 32 concurrent streams give the texts they give alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serve.conftest import API_KEY

OK = {"model": "serve", "prompt": "Hello there", "max_tokens": 3, "temperature": 0}

BAD_BODIES = [
    ("not json", b"{this is not json", "valid JSON"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe", "max_tokens": 3}', "UTF-8"),
    ("a list, not an object", b"[1, 2, 3]", "JSON object"),
    ("NaN temperature", b'{"prompt": "x", "temperature": NaN}', "NaN"),
    ("huge integer literal", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", "JSON"),
    ("deep nesting", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", ""),
]

BAD_FIELDS = [
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, None),  # clamped to the engine's limit: not an error
    ({"prompt": "x", "temperature": 1e308}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -7}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "logprobs": 10000}, "logprobs"),
    ({"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "min_tokens": 50, "max_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "x", "temprature": 0.5}, None),  # unknown: ignored and named in X-Ignored-Fields
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "user": ["alice"]}, "user"),
    ({"prompt": "x", "echo": True, "max_tokens": 0}, None),  # scores the prompt
    ({"prompt": "x", "logit_bias": {"5": 10}}, None),
    ({"prompt": "x", "logit_bias": {"five": 10}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1000}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": "10"}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(10**9): 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "x", "prompt_logprobs": 10000}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": ["x"] * 1000}, "prompt"),
    ({"prompt": [7] * 5000}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
]

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
]


def assert_alive(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json=OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("name", "body", "message"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_bodies_get_400(server, name, body, message):
    with server.client() as c:
        r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and message in err["message"]
        assert_alive(c)


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS, ids=[str(f)[:60] for f, _ in BAD_FIELDS])
def test_bad_fields_get_400_naming_the_field(server, fields, param):
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "serve", **fields})
        if param is None:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400, r.text
            assert param in r.json()["error"]["message"]
        assert_alive(c)


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT, ids=[str(f)[:60] for f, _ in BAD_CHAT])
def test_bad_chat_requests_get_400(server, fields, param):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json=fields)
        assert r.status_code == 400, r.text
        assert param in r.json()["error"]["message"]


def test_oversized_body_gets_413_declared_or_streamed(server):
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    with server.client() as c:
        assert c.post("/v1/completions", content=big).status_code == 413

        def chunks():  # no Content-Length: the cap applies while reading
            for i in range(0, len(big), 1 << 16):
                yield big[i : i + 1 << 16]

        assert c.post("/v1/completions", content=chunks()).status_code == 413
        assert_alive(c)


def test_every_route_but_health_needs_the_key(server):
    with server.client(key=None) as anon, server.client(key="sk-wrong") as wrong:
        assert anon.get("/health").status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("GET", "/ready"),
            ("GET", "/v1/models/serve"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
        ]:
            for c in (anon, wrong):
                r = c.request(method, path, json=OK)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
    with server.client() as c:
        assert c.get("/ready").json()["status"] == "ready"
        assert c.get("/nope").status_code == 404


def test_out_of_range_ids_in_the_middle_of_a_batch_do_not_harm_others(server):
    async def run():
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as c:
            good = [c.post("/v1/completions", json={**OK, "max_tokens": 8}) for _ in range(4)]
            bad = [c.post("/v1/completions", json={**OK, "prompt": [1, 99999]}) for _ in range(4)]
            return await asyncio.gather(*good, *bad)

    results = asyncio.run(run())
    assert [r.status_code for r in results] == [200] * 4 + [400] * 4
    assert len({r.json()["choices"][0]["text"] for r in results[:4]}) == 1


async def _stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, str]:
    body = {
        "model": "serve",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text, reason, done = [], None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            reason = choice["finish_reason"] or reason
    assert done
    return "".join(text), reason


def test_32_concurrent_streams_match_their_solo_runs(server):
    prompts = [f"Request number {i} asks about" + " lists" * (i % 5) for i in range(32)]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def solo():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as c:
            return [await _stream(c, p, 16) for p in prompts]

    async def together():
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=300, limits=httpx.Limits(max_connections=64)
        ) as c:
            return await asyncio.gather(*(_stream(c, p, 16) for p in prompts))

    alone = asyncio.run(solo())
    concurrent = asyncio.run(together())
    assert concurrent == alone
    assert all(reason == "length" for _, reason in concurrent)
    assert server.metric("llmbuild_kv_blocks_used") == 0
    assert server.metric("llmbuild_requests_running") == 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {
        "model": "serve",
        "prompt": "Disconnect me",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }

    async def run():
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        ) as c:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # leave after the first token, with 199 to go
            # non-streaming too: give up on the response after a moment
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/completions", json={**body, "stream": False}, timeout=0.1)

    asyncio.run(run())
    for _ in range(100):
        aborted = _labelled(server, "llmbuild_requests_total", 'finish_reason="abort"')
        if aborted >= 2 and server.metric("llmbuild_requests_running") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert aborted >= 2
    assert server.metric("llmbuild_kv_blocks_used") == 0


def _labelled(server, name: str, label: str) -> float:
    with server.client() as c:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith(name + "{") and label in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_expose_latency_histograms_and_counters(server):
    with server.client() as c:
        assert_alive(c)
        text = c.get("/metrics").text
    for name in [
        "llmbuild_time_to_first_token_seconds_bucket",
        "llmbuild_inter_token_latency_seconds_count",
        "llmbuild_e2e_request_latency_seconds_sum",
        "llmbuild_requests_waiting",
        "llmbuild_requests_running",
        "llmbuild_kv_blocks_used",
        "llmbuild_prefix_cache_hit_rate",
        "llmbuild_preemptions_total",
        "llmbuild_prompt_tokens_total",
        "llmbuild_generation_tokens_total",
        "llmbuild_step_time_seconds_total",
    ]:
        assert name in text, name
    assert server.metric("llmbuild_generation_tokens_total") > 0
    assert server.metric("llmbuild_e2e_request_latency_seconds_count") > 0
