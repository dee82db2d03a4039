"""`llmbuild bench serve` against a real server (the numbers are not asserted, only their sanity)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from llmbuild.cli import cli
from tests.serve.conftest import API_KEY, free_port


def test_bench_serve_reports_percentiles_and_server_split(server, tmp_path):
    out = tmp_path / "serve"
    args = ["bench", "serve", "--url", server.url, "--concurrency", "4", "--requests", "6", "--prompt-len", "12"]
    result = CliRunner().invoke(cli, [*args, "--max-tokens", "5", "--api-key", API_KEY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["requests"] == 6 and report["model"] == "serve"
    # every request produced exactly max_tokens tokens (EOS ignored)
    assert round(report["output_tok_s"] * report["wall_s"]) == 6 * 5
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p = report[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], key
    assert report["ttft_ms"]["p50"] < report["e2e_ms"]["p50"]
    assert 0 <= report["server"]["step_overhead_fraction"] < 1 and report["server"]["steps"] >= 5
    assert "| TTFT |" in out.with_suffix(".md").read_text()


def test_bench_serve_needs_a_server_and_a_key(server):
    down = CliRunner().invoke(cli, ["bench", "serve", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1"])
    assert down.exit_code != 0 and "cannot reach" in down.output
    no_key = CliRunner().invoke(cli, ["bench", "serve", "--url", server.url, "--requests", "1"])
    assert no_key.exit_code != 0 and "401" in no_key.output
