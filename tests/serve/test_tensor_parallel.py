"""`llmbuild serve` with a tensor-parallel engine: its ranks run as worker processes of the server,
and the server stops (non-zero exit, the dead rank named) rather than hanging when one dies."""

from __future__ import annotations

import os
import signal

import openai

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.helpers import worker_pids
from tests.serve.conftest import API_KEY, start_server

PROMPT = "The build system compiles"


def test_serves_a_tensor_parallel_engine_and_exits_when_a_worker_dies(make_ckpt, make_engine, llama_engine, tmp_path):
    engine = make_engine("llama-eager-tp2", make_ckpt("llama"), target={"backend": "eager", "tensor_parallel": 2})
    server = start_server(engine, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0)
        out = client.completions.create(
            model="llama-eager-tp2", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        with LLMEngine.from_dir(llama_engine) as llm:  # the same recipe built with one rank
            (expected,) = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == 12

        (worker,) = worker_pids(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        code = server.process.wait(timeout=60)  # noticed while idle, within a keep-alive tick
        log = server.log.read_text()
        assert code != 0, log
        assert f"tensor-parallel worker rank 1 (pid {worker}) exited with code -9" in log
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
