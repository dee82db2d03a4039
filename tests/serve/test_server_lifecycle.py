"""Limits and lifecycle of a real server process: bounded queue (429), key files, loopback bind,
and SIGTERM draining in-flight requests."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import start_server

LONG = {
    "model": "serve",
    "prompt": "Keep going",
    "max_tokens": 240,
    "temperature": 0,
    "stream": True,
    "ignore_eos": True,
}


async def _first_chunk_then_rest(client: httpx.AsyncClient, started: asyncio.Event) -> tuple[int, str | None]:
    """Stream LONG; set `started` at the first token; return (tokens seen, last finish_reason)."""
    tokens, reason = 0, None
    async with client.stream("POST", "/v1/completions", json={**LONG, "logprobs": 0}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                tokens += len(choice["logprobs"]["tokens"])
                reason = choice["finish_reason"] or reason
                started.set()
    return tokens, reason


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on `port`, from /proc/net/tcp (Linux)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        host, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
            found.add(".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
def test_binds_loopback_by_default_and_accepts_keys_from_a_file(serve_engine, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# operators\nsk-one\n\n  sk-two  \n")
    server = start_server(serve_engine, tmp_path / "log", "--api-key-file", str(keys), api_key=None)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"127.0.0.1"}
        for key, status in [("sk-one", 200), ("sk-two", 200), ("# operators", 401), ("", 401)]:
            with server.client(key=key) as c:
                assert c.get("/v1/models").status_code == status, key
    finally:
        assert server.stop() == 0


def test_a_full_queue_answers_429_and_recovers(serve_engine, tmp_path):
    # capacity = max_batch_size (8) running + max_queue (0) waiting
    server = start_server(serve_engine, tmp_path / "log", "--max-queue", "0")
    headers = {"Authorization": "Bearer sk-test-key"}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            events = [asyncio.Event() for _ in range(8)]
            streams = [asyncio.create_task(_first_chunk_then_rest(c, e)) for e in events]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            refused = await c.post("/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
            results = await asyncio.gather(*streams)
            after = await c.post("/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
            return refused, results, after

    try:
        refused, results, after = asyncio.run(run())
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert results == [(240, "length")] * 8  # the admitted requests were not disturbed
        assert after.status_code == 200
    finally:
        assert server.stop() == 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(serve_engine, tmp_path):
    server = start_server(serve_engine, tmp_path / "log", "--shutdown-timeout", "60")
    headers = {"Authorization": "Bearer sk-test-key"}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            started = asyncio.Event()
            stream = asyncio.create_task(_first_chunk_then_rest(c, started))
            await asyncio.wait_for(started.wait(), 60)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            try:
                late = (await c.post("/v1/completions", json={**LONG, "stream": False})).status_code
            except httpx.TransportError:
                late = "refused"  # the listening socket is already closed: also a refusal
            return await stream, late

    in_flight, late = asyncio.run(run())
    assert in_flight == (240, "length")
    assert late in (503, "refused")
    start = time.monotonic()
    assert server.process.wait(60) == 0, server.log.read_text()
    assert time.monotonic() - start < 30
