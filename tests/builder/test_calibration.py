"""Calibration data: windows of the built-in or a user's text, deterministic for a seed, and the
layer-by-layer pass that AWQ and GPTQ observe activations through."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from llmbuild.builder.calibration import BUILTIN, LayerwisePass, calibration_windows, observe_inputs
from llmbuild.builder.plan import make_plan
from llmbuild.builder.quality import HELD_OUT
from llmbuild.errors import RecipeError
from llmbuild.recipe import CalibrationSection, load_recipe
from tests.builder.quantization_fixtures import DEMO, demo_model, sequence_logits
from tests.conftest import write_recipe

PARAGRAPHS = [f"Paragraph number {i} says something about the interpreter and its modules." for i in range(40)]


def token_stream(texts: list[str]) -> list[int]:
    tok = AutoTokenizer.from_pretrained(DEMO)
    return [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]


def is_slice_of(window: torch.Tensor, stream: list[int]) -> bool:
    w = window.tolist()
    return any(stream[i : i + len(w)] == w for i in range(len(stream) - len(w) + 1))


def test_builtin_windows_are_slices_of_the_text_and_deterministic_for_a_seed():
    section = CalibrationSection(num_samples=6, seq_len=64, seed=3)
    a = calibration_windows(section, DEMO, DEMO)
    assert a.shape == (6, 64) and a.dtype == torch.int64
    assert torch.equal(a, calibration_windows(section, DEMO, DEMO))
    other = calibration_windows(section.model_copy(update={"seed": 4}), DEMO, DEMO)
    assert not torch.equal(a, other)
    stream = token_stream([p for p in BUILTIN.read_text().split("\n\n") if p.strip()])
    assert all(is_slice_of(w, stream) for w in a)


def test_builtin_text_is_disjoint_from_the_held_out_text():
    calibration = {p.strip() for p in BUILTIN.read_text().split("\n\n")}
    held_out = {p.strip() for p in HELD_OUT.read_text().split("\n\n")}
    assert len(calibration) > 1000 and not calibration & held_out


def test_txt_and_jsonl_files_give_the_same_windows(tmp_path):
    (tmp_path / "cal.txt").write_text("\n\n".join(PARAGRAPHS))
    (tmp_path / "cal.jsonl").write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PARAGRAPHS)))
    txt = calibration_windows(CalibrationSection(dataset="cal.txt", num_samples=4, seq_len=32), tmp_path, DEMO)
    jsonl = calibration_windows(CalibrationSection(dataset="cal.jsonl", num_samples=4, seq_len=32), tmp_path, DEMO)
    assert torch.equal(txt, jsonl)
    assert all(is_slice_of(w, token_stream(PARAGRAPHS)) for w in txt)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.txt", None, "file not found"),
        ("cal.csv", "a,b\n", "neither `builtin` nor a .txt / .jsonl file"),
        ("cal.jsonl", '{"text": "fine"}\n{not json}\n', r"cal.jsonl:2: not a JSON object"),
        ("cal.jsonl", '{"body": "no text key"}\n', r'cal.jsonl:1: expected an object with a "text" string'),
        ("cal.txt", "Too short.", r"has \d+ tokens, fewer than quantization.calibration.seq_len \(64\)"),
    ],
)
def test_bad_calibration_files_fail_with_one_line(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(RecipeError, match=message) as exc:
        calibration_windows(CalibrationSection(dataset=name, num_samples=2, seq_len=64), tmp_path, DEMO)
    assert "\n" not in str(exc.value)


def test_plan_fails_when_the_calibration_file_is_missing(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        DEMO,
        quantization={"weights": "int4", "group_size": 64, "method": "gptq", "calibration": {"dataset": "nope.txt"}},
    )
    with pytest.raises(RecipeError, match=r"calibration.dataset: file not found: .*nope.txt"):
        make_plan(load_recipe(recipe))


def test_layerwise_pass_reproduces_the_full_forward_and_shows_each_input():
    model = demo_model()
    windows = calibration_windows(CalibrationSection(num_samples=3, seq_len=40), DEMO, DEMO)
    runner = LayerwisePass(model, windows, chunk_tokens=80)  # two chunks: 2 windows, then 1
    assert [len(c) for c in runner.chunks] == [2, 1]
    seen: dict[str, int] = {}
    for layer in model.layers:
        remove = observe_inputs(
            {"qkv": layer.attn.qkv, "down": layer.mlp.down},
            lambda name, x: seen.__setitem__(name, seen.get(name, 0) + len(x)),
        )
        runner.advance(runner.run(layer))
        remove()
    assert seen == {"qkv": 3 * 40 * model.cfg.num_layers, "down": 3 * 40 * model.cfg.num_layers}
    hidden = torch.cat(runner.final_hidden())
    logits = (hidden @ model.embed.weight.T).float()  # the tied lm_head
    expected = torch.cat([sequence_logits(model, w) for w in windows])
    # bf16 GEMMs of other shapes (chunks of 80 rows against windows of 40) sum in another order, and which kernel
    # takes which shape depends on the CPU's ISA: up to one bf16 ulp at the largest logits (16-32) apart
    torch.testing.assert_close(logits, expected, atol=0.125, rtol=0.02)
