"""Real `llmbuild serve` processes on 127.0.0.1, started from the CLI, for real clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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
