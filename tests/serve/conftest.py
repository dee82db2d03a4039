"""Real `llmbuild serve` processes on 127.0.0.1, started from the CLI, for real clients; and the
app in-process over a fake engine (FakeLLM), for tests of its pieces that need no model."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llmbuild.errors import RequestError
from llmbuild.recipe import ServeSection
from llmbuild.runtime.llm_engine import RequestOutput
from llmbuild.runtime.logprobs import TokenLogprobs
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.serve.app import create_app
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.context import ServeContext
from llmbuild.serve.metrics import Metrics

API_KEY = "sk-test-key"


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def client(self, key: str | None = API_KEY, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-us series (model label only) from /metrics."""
        text = self.client().get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: Path, log: Path, *args: str, api_key: str | None = API_KEY) -> Server:
    """Start `llmbuild serve` and wait until /health answers (fails with the server's log if it dies)."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmbuild.cli", "serve", str(engine), "--port", str(port), "--log-level", "warning"]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LLMBUILD_API_KEY", None)
    out = log.open("w")
    process = subprocess.Popen([*cmd, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="session")
def serve_engine(make_ckpt, make_engine) -> Path:
    """A tiny engine with a small KV block size, so prefix caching and block accounting show."""
    return make_engine(
        "serve",
        make_ckpt("llama"),
        limits={"max_batch_size": 8, "max_seq_len": 256, "max_num_tokens": 64},
        kv_cache={"block_size": 8},
    )


@pytest.fixture(scope="module")
def server(serve_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(serve_engine, tmp_path_factory.mktemp("server") / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="session")
def tools_engine(make_ckpt, make_engine) -> Path:
    """A tiny engine with room for tool prompts: the checkpoints' chat template renders tools, and its
    instructions alone are ~400 tokens of the tests' 512-token vocabulary."""
    return make_engine(
        "tools",
        make_ckpt("long-context", max_position_embeddings=2048),
        limits={"max_batch_size": 8, "max_seq_len": 1536, "max_num_tokens": 256},
    )


@pytest.fixture(scope="module")
def tools_server(tools_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tools_engine, tmp_path_factory.mktemp("tools-server") / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()


class FakeTokenizer:
    """One token per character (id = code point + 3; 1 is BOS) and a `role: content` chat template
    that knows only the system, user and assistant roles."""

    chat_template = "role: content"

    def encode(self, text: str) -> list[int]:
        return [1] + [ord(c) + 3 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
        assert kwargs["tokenize"] and not kwargs["return_dict"]
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']}")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if kwargs["add_generation_prompt"] else ""))


class FakeLLM:
    """The part of LLMEngine that AsyncEngine and the app use. Every step gives each request the
    next letter of the alphabet (a, b, c, ...) until its max_tokens; `refuse` makes add_request
    raise RequestError with that message, as a request that can never fit the KV cache does."""

    def __init__(self, max_seq_len: int = 64) -> None:
        self.tokenizer = FakeTokenizer()
        self.limits = SimpleNamespace(max_batch_size=4, max_seq_len=max_seq_len)
        serve = ServeSection(max_tokens=5, temperature=0.5, top_p=0.9, top_k=7)
        model = SimpleNamespace(vocab_size=1000)
        self.engine = SimpleNamespace(
            manifest=SimpleNamespace(name="fake", model=model, limits=self.limits, serve=serve)
        )
        self.pool = SimpleNamespace(num_blocks=32, num_free=32)
        self.scheduler = SimpleNamespace(
            waiting=[], running=[], num_preemptions=0, prefix_queried_tokens=0, prefix_hit_tokens=0
        )
        self.model_seconds = 0.0
        self.speculator = None
        self.loras = None  # no LoRA slots
        self.refuse: str | None = None
        self.running: list[Request] = []
        self._ids = itertools.count()

    def make_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        lora: str | None = None,
    ) -> Request:
        assert lora is None, "the fake engine has no LoRA slots"
        if any(t >= 1000 for t in prompt):
            raise RequestError("prompt token id is out of range [0, 1000)")
        max_tokens = min(params.max_tokens, self.limits.max_seq_len - len(prompt))
        return Request(request_id or f"req-{next(self._ids)}", list(prompt), params, max_tokens, priority=priority)

    def add_request(self, request: Request) -> None:
        if self.refuse is not None:
            raise RequestError(self.refuse)
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def keep_alive(self) -> None:
        pass

    def abort(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for r in list(self.running):
            token = ord("a") + 3 + len(r.output_token_ids) % 26
            r.output_token_ids.append(token)
            done = len(r.output_token_ids) >= r.max_tokens
            if done:
                self.running.remove(r)
            lp = None if r.params.logprobs is None else TokenLogprobs(token, -0.5, [(token, -0.5), (token + 1, -1.5)])
            outputs.append(RequestOutput(r.request_id, token, chr(token - 3), "length" if done else None, lp))
        return outputs


@pytest.fixture
def fake_llm() -> FakeLLM:
    return FakeLLM()


@pytest.fixture
def serve_context(fake_llm: FakeLLM) -> ServeContext:
    """The context of a server over fake_llm (its step loop not running), with small caps."""
    config = ServeConfig(max_n=4, max_prompts=3, max_top_logprobs=5, max_stop=2, max_stop_len=8, max_body_bytes=2048)
    return ServeContext.create(AsyncEngine(fake_llm, Metrics("fake"), 4), config)


@pytest.fixture
def app_client(fake_llm: FakeLLM) -> Iterator[TestClient]:
    """The app over fake_llm in-process, its AsyncEngine stepping on a thread; no API key."""
    engine = AsyncEngine(fake_llm, Metrics("fake"), max_queue=4)
    loop = threading.Thread(target=engine.run, name="fake-step-loop", daemon=True)
    loop.start()
    with TestClient(create_app(engine, ServeConfig())) as client:
        yield client
    loop.join(timeout=10)
    assert not loop.is_alive()
