"""`llmbuild bench` end to end on the tiny engine (numbers are not asserted, only their sanity)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_bench_compares_speculation_on_and_off(make_engine, tmp_path):
    # not adaptive: the adaptive switch may stop proposals after the warm-up on a busy machine (it measures),
    # and this test needs proposals in the measured runs; --num-speculative-tokens keeps the engine's settings
    demo = Path(__file__).parents[2] / "models" / "demo"
    engine = make_engine(
        "demo-spec-not-adaptive",
        demo,
        model={"dtype": "float32"},
        speculative={"adaptive": False, "min_acceptance_rate": 0},
    )
    out = tmp_path / "spec"
    args = ["bench", str(engine), "--batch", "1", "--prompt-len", "16", "--new-tokens", "8", "--repeats", "2"]
    main([*args, "--workload", "repeat", "--num-speculative-tokens", "3", "--compare-speculative", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    labels = {r["backend"] for r in report["summary"]}
    assert labels == {f"{report['backend']}, speculative k=3", f"{report['backend']}, speculation off"}
    spec = next(r for r in report["summary"] if "k=3" in r["backend"])
    assert sum(r["draft_tokens"] for r in report["runs"]) > 0  # the repeated prompt gives prompt lookup matches
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["mean_accepted_len"] >= 0
    assert "acceptance_rate" not in next(r for r in report["summary"] if "off" in r["backend"])
    assert "| accepted (rate, mean length) |" in out.with_suffix(".md").read_text()


def test_bench_measures_the_backend_asked_for(llama_engine, tmp_path):
    out = tmp_path / "eager"
    args = ["bench", str(llama_engine), "--batch", "1", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"]
    main([*args, "--backend", "eager", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["backend"] == "eager" and {r["backend"] for r in report["summary"]} == {"eager"}


def test_text_workloads_are_held_out_prose_and_a_passage_the_answer_is_to_repeat(demo_engine):
    import torch

    from llmbuild.bench.offline import GROUNDED_CUE, HELD_OUT_TEXT, make_prompt
    from llmbuild.runtime.llm_engine import LLMEngine

    llm = LLMEngine.from_dir(demo_engine, speculative=False)
    try:
        held_out = " ".join(HELD_OUT_TEXT.read_text(encoding="utf-8").split())
        text = make_prompt(torch.Generator().manual_seed(3), llm, 64, "text")
        assert len(text) == 64
        assert " ".join(llm.tokenizer.decode(text).split()[1:-1]) in held_out  # whole words, as written
        grounded = make_prompt(torch.Generator().manual_seed(3), llm, 64, "grounded")
        blank = llm.tokenizer.encode("\n\n", add_special_tokens=False)
        passage = grounded[: 64 - len(blank) - GROUNDED_CUE]
        assert len(grounded) == 64 and grounded == passage + blank + passage[:GROUNDED_CUE]
        assert make_prompt(torch.Generator().manual_seed(4), llm, 64, "grounded") != grounded  # seeded, not fixed
        assert len(make_prompt(torch.Generator().manual_seed(3), llm, 40000, "text")) == 40000  # longer than the text
    finally:
        llm.close()
