"""Build stages: timings, the progress each long stage reports, and a calibrated build's progress."""

from __future__ import annotations

from collections import defaultdict

from llmbuild.builder.build import build_engine
from llmbuild.builder.stages import Stages, no_progress
from llmbuild.recipe import load_recipe
from tests.conftest import write_recipe


def test_a_stage_hands_out_progress_bound_to_its_name():
    heard: list[tuple[str, int, int]] = []
    stages = Stages(on_progress=lambda *event: heard.append(event))
    with stages.run("quality") as progress:
        progress(1, 2)
        progress(2, 2)
    assert heard == [("quality", 1, 2), ("quality", 2, 2)] and "quality" in stages.timings
    with Stages().run("plan") as progress:  # library use without a callback reports nowhere
        assert progress is no_progress


def test_calibrated_build_reports_increasing_counts_in_its_long_stages(make_ckpt, tmp_path):
    recipe = write_recipe(
        tmp_path / "gptq.yaml",
        make_ckpt("llama"),
        limits={"max_seq_len": 64, "max_num_tokens": 64},
        quantization={
            "weights": "int8",
            "method": "gptq",
            "kv_cache": "int8",
            "calibration": {"num_samples": 4, "seq_len": 32},
        },
    )
    events: dict[str, list[tuple[int, int]]] = defaultdict(list)
    stages: list[tuple[str, float | None]] = []
    build_engine(
        load_recipe(recipe),
        tmp_path / "engine",
        cache_dir=tmp_path / "cache",  # empty: every stage runs (the op library is cached per machine)
        on_stage=lambda *event: stages.append(event),
        on_progress=lambda stage, done, total: events[stage].append((done, total)),
    )
    assert set(events) == {"calibration data", "quantize (gptq)", "calibrate int8 KV cache", "quality"}
    assert [done for done, _ in events["quantize (gptq)"]] == [1, 2]  # one per decoder layer
    assert events["calibrate int8 KV cache"][-1] == (4, 4)  # windows
    for stage, counts in events.items():
        dones, totals = [d for d, _ in counts], {t for _, t in counts}
        assert len(totals) == 1 and dones == sorted(set(dones)) and dones[-1] == totals.pop(), stage
        # every report falls between its stage's start and end
        start = stages.index((stage, None))
        assert stages[start + 1][0] == stage and stages[start + 1][1] is not None
    assert len(events["quality"]) > 2  # step by step, not once per side
