"""The server's own routes: /v1/models/{id}, and the probes with and without --public-probes."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from llmbuild.serve.app import create_app
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.context import ServerState
from llmbuild.serve.metrics import Metrics
from tests.serve.conftest import API_KEY, start_server

API_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/serve"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]


def test_retrieve_the_served_model(server):
    client = openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0)
    model = client.models.retrieve("serve")
    assert (model.id, model.object, model.owned_by) == ("serve", "model", "llmbuild")
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist; this server serves 'serve'"):
        client.models.retrieve("gpt-4")


def test_an_unknown_model_id_is_an_openai_404_even_with_a_slash(server):
    with server.client() as c:
        r = c.get("/v1/models/org/serve")
    assert r.status_code == 404
    assert r.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "not_found_error",
        "param": "model",
        "code": 404,
    }
    assert "'org/serve' does not exist" in r.json()["error"]["message"]


def test_public_probes_open_the_probes_and_nothing_else(serve_engine, tmp_path):
    server = start_server(serve_engine, tmp_path / "log", "--public-probes")
    try:
        with server.client(key=None) as anon:
            assert anon.get("/health").json() == {"status": "ok"}
            assert anon.get("/ready").json() == {"status": "ready", "model": "serve"}
            metrics = anon.get("/metrics")
            assert metrics.status_code == 200 and "llmbuild_requests_running" in metrics.text
            for method, path in API_ROUTES:
                r = anon.request(method, path, json={"prompt": "x"})
                assert r.status_code == 401, (path, r.text)
    finally:
        assert server.stop() == 0


def test_without_public_probes_only_health_is_open(server):
    with server.client(key=None) as anon:
        assert anon.get("/health").status_code == 200
        assert anon.get("/ready").status_code == 401
        assert anon.get("/metrics").status_code == 401


@pytest.mark.parametrize("public", [True, False])
def test_ready_is_503_while_draining_or_after_the_engine_stopped(fake_llm, public):
    # in-process: a real server closes its listening socket as it starts to drain, so a probe
    # over TCP sees the refusal; the 503 covers a connection that is already open
    state = ServerState()
    engine = AsyncEngine(fake_llm, Metrics("fake"), max_queue=4)
    config = ServeConfig(api_keys=(API_KEY,), public_probes=public)
    headers = {} if public else {"Authorization": f"Bearer {API_KEY}"}
    with TestClient(create_app(engine, config, state), headers=headers) as client:
        assert client.get("/ready").json() == {"status": "ready", "model": "fake"}
        state.draining = True
        r = client.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        state.draining = False
        engine.stop()
        r = client.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "engine stopped"})
        assert client.get("/health").status_code == 503


def test_speculative_decoding_is_counted_and_a_request_may_opt_out(demo_engine, tmp_path):
    server = start_server(demo_engine, tmp_path / "log", "--num-speculative-tokens", "3", "--model-name", "demo")
    try:
        prompt = "The dictionary is a mapping of keys to values. The dictionary is"
        body = {"model": "demo", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        with server.client() as c:
            speculated = c.post("/v1/completions", json=body).json()
            drafted = server.metric("llmbuild_spec_decode_num_draft_tokens_total")
            alone = c.post("/v1/completions", json=body | {"speculate": False}).json()
            assert server.metric("llmbuild_spec_decode_num_draft_tokens_total") == drafted  # opted out
            assert c.post("/v1/completions", json=body | {"speculate": "maybe"}).status_code == 400
        assert speculated["choices"][0]["text"] == alone["choices"][0]["text"]
        assert speculated["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"] == 24
        assert drafted > 0 and server.metric("llmbuild_spec_decode_num_drafts_total") > 0
        accepted = server.metric("llmbuild_spec_decode_num_accepted_tokens_total")
        assert 0 <= accepted <= drafted
    finally:
        assert server.stop() == 0
