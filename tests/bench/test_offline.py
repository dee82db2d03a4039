"""`llmbuild bench` end to end on the tiny engine (numbers are not asserted, only their sanity)."""

from __future__ import annotations

import json

from llmbuild.cli import main
from llmbuild.machine import cpu_flags
from llmbuild.plugins.library import compiled_isas


def test_bench_writes_json_and_markdown(llama_engine, tmp_path, capsys):
    out = tmp_path / "results" / "tiny"
    main(
        [
            "bench",
            str(llama_engine),
            "--batch",
            "1",
            "--batch",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--repeats",
            "2",
            "--compare-eager",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.with_suffix(".json").read_text())
    assert {(r["backend"], r["batch"]) for r in report["summary"]} == {("eager", 1), ("eager", 2)} | {
        (report["backend"], 1),
        (report["backend"], 2),
    }
    assert len(report["runs"]) == 2 * 2 * 2
    for run in report["runs"]:
        assert run["ttft_ms"] > 0 and run["decode_tok_s"] > 0 and run["total_tok_s"] > 0
    assert report["read_bandwidth_gbs"] > 0 and report["peak_rss_mib"]["engine"] > 0
    # what ran where: the CPU, its ISA flags, the kernel tier in use, how long the engine took to load
    assert report["cpu"] and report["target_cpu"] == "native" and report["load_s"] > 0
    assert report["kernel_isa"] == compiled_isas()[0] and set(report["cpu_isa_flags"]) <= cpu_flags()
    assert "| backend | batch |" in out.with_suffix(".md").read_text()
    assert "decode ceiling" in capsys.readouterr().out
