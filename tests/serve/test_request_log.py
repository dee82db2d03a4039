"""Request ids (X-Request-Id in, header, body id, engine id) and one log line per finished request,
against a real server logging JSON at info level."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import Server, start_server

OK = {"model": "serve", "prompt": "Hello there", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "serve", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def json_server(serve_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("request-log") / "server.log"
    s = start_server(serve_engine, log, "--log-level", "info", "--log-format", "json")
    yield s
    assert s.stop() == 0, s.log.read_text()


def _lines(server: Server, marker: str) -> list[str]:
    time.sleep(0.3)  # the line is written after the response's last byte
    return [line for line in server.log.read_text().splitlines() if marker in line]


def _request_line(server: Server, rid: str) -> dict:
    (line,) = _lines(server, rid)
    return json.loads(line)


def test_a_client_id_is_echoed_in_the_header_the_body_and_one_log_line(json_server):
    rid = "client:req-1." + uuid.uuid4().hex[:8]
    with json_server.client() as c:
        r = c.post("/v1/completions", json=OK, headers={"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    body = r.json()
    assert body["id"] == f"cmpl-{rid}"
    entry = _request_line(json_server, rid)  # exactly one line, uvicorn's access log off
    assert entry["logger"] == "llmbuild.serve.requests" and entry["level"] == "info"
    assert entry["method"] == "POST" and entry["route"] == "/v1/completions"
    assert entry["status"] == 200 and entry["streamed"] is False
    assert entry["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert entry["completion_tokens"] == body["usage"]["completion_tokens"] == 3
    assert entry["cached_tokens"] == 0
    assert entry["finish_reasons"] == ["length"] and entry["error"] is None
    assert 0 < entry["ttft_ms"] <= entry["e2e_ms"] < 60_000
    assert not _lines(json_server, '"POST /v1/completions HTTP/1.1"')  # no uvicorn access line at all


def test_a_repeated_prompt_logs_its_cached_tokens(json_server):
    prompt = "the same long prefix, repeated so that whole KV blocks of it are cached " * 2
    rids = [uuid.uuid4().hex, uuid.uuid4().hex]
    with json_server.client() as c:
        for rid in rids:
            r = c.post("/v1/completions", json={**OK, "prompt": prompt}, headers={"X-Request-Id": rid})
            assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and _request_line(json_server, rids[1])["cached_tokens"] == cached


@pytest.mark.parametrize("bad", ["", "x" * 129, "has space", "semi;colon", "naïve"])
def test_an_invalid_id_is_a_400_naming_the_header(json_server, bad):
    with json_server.client() as c:
        r = c.post("/v1/completions", json=OK, headers={"X-Request-Id": bad.encode()})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("X-Request-Id header: must be 1 to 128 characters of")
    made = r.headers["x-request-id"]
    assert made != bad and len(made) == 32
    entry = _request_line(json_server, made)
    assert entry["status"] == 400 and entry["error"] == "invalid_request_error" and entry["prompt_tokens"] is None


def test_an_id_is_made_when_none_is_sent_and_errors_are_logged_too(json_server):
    with json_server.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        missing = c.post("/v1/completions", json={**OK, "model": "other"})
    made = r.headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0 and r.json()["id"] == f"chatcmpl-{made}"
    assert _request_line(json_server, made)["route"] == "/v1/chat/completions"
    assert missing.status_code == 404
    entry = _request_line(json_server, missing.headers["x-request-id"])
    assert entry["status"] == 404 and entry["error"] == "not_found_error"


def test_an_unauthenticated_request_still_gets_an_id_and_a_line(json_server):
    with json_server.client(key=None) as c:
        r = c.get("/v1/models", headers={"X-Request-Id": "no-key-1"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "no-key-1"
    assert _request_line(json_server, "no-key-1")["error"] == "authentication_error"


def test_a_stream_carries_the_header_and_logs_once_with_n_choices(json_server):
    rid = "stream-" + uuid.uuid4().hex
    body = {**CHAT, "stream": True, "n": 2, "seed": 1, "temperature": 1.0}
    with json_server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == rid
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert {chunk["id"] for chunk in chunks} == {f"chatcmpl-{rid}"}
    entry = _request_line(json_server, rid)
    assert entry["streamed"] is True and entry["status"] == 200
    assert entry["completion_tokens"] == 4 and entry["finish_reasons"] == ["length", "length"]


def test_the_ignored_fields_warning_names_the_request(json_server):
    rid = "warn-" + uuid.uuid4().hex
    with json_server.client() as c:
        r = c.post("/v1/completions", json={**OK, "zz_unknown": 1}, headers={"X-Request-Id": rid})
    assert r.status_code == 200
    warning, request = (json.loads(line) for line in _lines(json_server, rid))
    assert warning["level"] == "warning" and warning["request_id"] == rid and "zz_unknown" in warning["message"]
    assert request["logger"] == "llmbuild.serve.requests"


def test_every_line_is_one_json_object(json_server):
    with json_server.client() as c:
        c.get("/health")
    lines = _lines(json_server, "")
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_text_format_is_one_key_value_line(server):
    # the shared server logs at warning: the request line (info) is off there, and so is uvicorn's
    rid = "text-" + uuid.uuid4().hex
    with server.client() as c:
        r = c.post("/v1/completions", json=OK, headers={"X-Request-Id": rid})
    assert r.headers["x-request-id"] == rid and not _lines(server, rid)


def test_text_lines_at_info(serve_engine, tmp_path):
    s = start_server(serve_engine, tmp_path / "server.log", "--log-level", "info")
    try:
        with s.client() as c:
            r = c.post("/v1/completions", json=OK, headers={"X-Request-Id": "text-line-1"})
        assert r.status_code == 200
        (line,) = _lines(s, "text-line-1")
        assert line.startswith("INFO:  request request_id=text-line-1 method=POST route=/v1/completions status=200 ")
        assert "prompt_tokens=" in line and " finish_reasons=length" in line and "streamed=false" in line
        assert not _lines(s, "HTTP/1.1")
    finally:
        assert s.stop() == 0, s.log.read_text()


def test_an_id_in_flight_is_refused_without_harming_the_first_request(json_server):
    rid = "dup-" + uuid.uuid4().hex
    body = {**OK, "max_tokens": 40, "stream": True}
    with json_server.client() as c:
        with c.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": rid}) as first:
            events = first.iter_lines()
            assert next(e for e in events if e.startswith("data: {"))  # the first request is running
            second = c.post("/v1/completions", json=OK, headers={"X-Request-Id": rid})
            rest = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert second.status_code == 400 and "already in use" in second.json()["error"]["message"]
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and len(rest) == 39
