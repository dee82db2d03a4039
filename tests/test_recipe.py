from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from llmbuild.builder.plan import make_plan
from llmbuild.builder.support import check_supported, cuda_build_problem, unsupported_features
from llmbuild.errors import RecipeError
from llmbuild.recipe import load_recipe, parse_recipe

BASE = {"name": "t", "model": {"checkpoint": "ckpt"}}


def parse(**sections):
    return parse_recipe({**BASE, **sections})


def test_bundled_demo_recipe_is_valid():
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "demo.yaml")
    assert recipe.name == "demo"
    assert recipe.checkpoint_dir() == (Path(__file__).parents[1] / "models" / "demo").resolve()


def test_checkpoint_is_relative_to_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"checkpoint": "../models/x"}}))
    assert load_recipe(path).checkpoint_dir() == (tmp_path / "models" / "x").resolve()


def test_resolved_yaml_round_trips():
    recipe = parse(limits={"max_seq_len": 512}, kv_cache={"memory_bytes": "1GiB"})
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.kv_cache.memory_bytes == 2**30


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"quantization": {"group_size": 100}}, "quantization.group_size: must be one of 32, 64, 128 (got 100)"),
        ({"quantization": {"groupsize": 64}}, "quantization.groupsize: unknown key (did you mean 'group_size'?"),
        ({"limits": {"max_batch_size": 0}}, "limits.max_batch_size: must be >= 1 (got 0)"),
        ({"limits": {"max_batch_size": "many"}}, "limits.max_batch_size: must be a valid integer"),
        ({"model": {"checkpoint": "c", "dtype": "fp64"}}, "model.dtype: must be one of"),
        ({"target": {"device": "tpu"}}, "target.device: must be one of 'cpu', 'cuda'"),
        ({"target": {"arch": "hopper"}}, "target.arch: must be 'auto' or a GPU architecture like sm_90"),
        ({"kv_cache": {"block_size": 7}}, "kv_cache.block_size: must be one of 8, 16, 32, 64, 128"),
        ({"kv_cache": {"memory_bytes": "2GiB", "memory_fraction": 0.5}}, "set memory_fraction (0.5) or memory_bytes"),
        ({"limits": {"max_batch_size": 16, "max_num_tokens": 4}}, "max_num_tokens (4) must be >= max_batch_size (16)"),
        ({"cuda_graphs": {"enabled": True}}, "cuda_graphs.enabled needs target.device=cuda"),
        ({"quantization": {"weights": "fp8"}}, "quantization.weights=fp8 needs a GPU target"),
        ({"quantization": {"method": "awq"}}, "method=awq needs weights int8, int4 or fp8"),
        (
            {"quantization": {"weights": "int4", "calibration": {}}},
            "calibration is used by method awq, gptq or smoothquant and by kv_cache int8 or fp8 (here: method rtn, "
            "kv_cache auto)",
        ),
        (
            {"quantization": {"weights": "int4", "activations": "int8"}},
            "activations=int8 needs weights int8 (weights is int4): set quantization.weights: int8",
        ),
        ({"quantization": {"activations": "int8"}}, "activations=int8 needs weights int8 (weights is none)"),
        (
            {"quantization": {"weights": "int8", "activations": "int8", "method": "awq"}},
            "activations=int8 takes method smoothquant or rtn (no smoothing), not awq",
        ),
        (
            {"quantization": {"weights": "int8", "method": "smoothquant"}},
            "method=smoothquant smooths int8 activations (activations is none): set quantization.activations: int8",
        ),
        (
            {"quantization": {"weights": "int8", "smoothquant_alpha": 0.8}},
            "smoothquant_alpha=0.8 applies to method smoothquant (method is rtn)",
        ),
        (
            {
                "quantization": {
                    "weights": "int8",
                    "activations": "int8",
                    "method": "smoothquant",
                    "smoothquant_alpha": 1,
                }
            },
            "quantization.smoothquant_alpha: must be < 1",
        ),
        (
            {
                "quantization": {
                    "weights": "int8",
                    "activations": "int8",
                    "method": "smoothquant",
                    "smoothquant_alpha": 0,
                }
            },
            "quantization.smoothquant_alpha: must be > 0",
        ),
        ({"quantization": {"kv_cache": "fp8"}}, "quantization.kv_cache=fp8 needs a GPU target"),
        (
            {"quantization": {"weights": "int4", "method": "gptq", "calibration": {"seq_len": 4}}},
            "seq_len: must be >= 16",
        ),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"speculative": {"method": "medusa"}}, "speculative.method: must be"),
        ({"speculative": {"num_speculative_tokens": 0}}, "speculative.num_speculative_tokens: must be >= 1 (got 0)"),
        ({"speculative": {"lookup_max": 3}}, "speculative.lookup_max: unknown key (did you mean 'prompt_lookup_max'?"),
        (
            {"speculative": {"prompt_lookup_min": 3, "prompt_lookup_max": 2}},
            "prompt_lookup_min (3) must be <= prompt_lookup_max (2)",
        ),
        ({"speculative": {"min_acceptance_rate": 1.5}}, "speculative.min_acceptance_rate: must be <= 1"),
        ({"name": "has space"}, "name: must match pattern"),
    ],
)
def test_invalid_values_name_their_key_path(sections, message):
    with pytest.raises(RecipeError) as exc:
        parse(**sections)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_int8_activations_take_int8_weights_rounded_or_smoothed(method):
    q = parse(quantization={"weights": "int8", "activations": "int8", "method": method}).quantization
    assert q.quantized and q.calibrated == (method == "smoothquant")
    assert q.smoothquant_alpha == 0.5


def test_int8_kv_cache_takes_a_calibration_section_without_weight_quantization():
    recipe = parse(quantization={"kv_cache": "int8", "calibration": {"num_samples": 8}})
    assert recipe.quantization.calibrated and recipe.quantization.quantized
    assert recipe.quantization.calibration_or_default().num_samples == 8


def test_missing_required_key():
    with pytest.raises(RecipeError, match="model: required key is missing"):
        parse_recipe({"name": "x"})


def test_malformed_yaml_points_at_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  checkpoint: [unclosed\n  dtype: bfloat16\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_recipe(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "sections,feature",
    [
        ({"quality": {"max_kl": 0.1}}, "quality gate"),
    ],
)
def test_later_features_are_rejected_not_ignored(sections, feature):
    recipe = parse(**sections)
    with pytest.raises(RecipeError) as exc:
        check_supported(recipe)
    assert str(exc.value).startswith("not supported yet: ")
    assert feature in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_cuda_recipe_needs_a_gpu_on_the_build_machine():
    with pytest.raises(RecipeError, match="target.device=cuda needs a GPU on the build machine"):
        check_supported(parse(target={"device": "cuda"}))


@pytest.mark.parametrize(
    "target,quantization,gpu,reason",
    [
        ({}, {}, "sm_90", None),
        ({"arch": "sm_90"}, {"weights": "fp8", "kv_cache": "fp8"}, "sm_90", None),
        ({}, {"weights": "fp8"}, "sm_89", None),
        ({"arch": "sm_90"}, {}, "sm_80", "target.arch=sm_90 but this machine's GPU is sm_80"),
        (
            {},
            {"weights": "fp8", "kv_cache": "fp8"},
            "sm_80",
            "weights=fp8 and quantization.kv_cache=fp8 needs an sm_89",
        ),
        ({}, {"kv_cache": "fp8"}, "sm_86", "quantization.kv_cache=fp8 needs an sm_89 or newer GPU"),
        ({}, {"weights": "int8", "activations": "int8", "method": "smoothquant"}, "sm_80", None),
    ],
)
def test_a_cuda_recipe_must_fit_the_build_machines_gpu(target, quantization, gpu, reason):
    recipe = parse(target={"device": "cuda", **target}, quantization=quantization)
    got = cuda_build_problem(recipe, gpu)
    assert got is None if reason is None else reason in got


def test_tensor_parallel_cuda_engines_are_rejected_by_name():
    assert unsupported_features(parse(target={"device": "cuda", "tensor_parallel": 2})) == [
        "target.tensor_parallel > 1 with target.device=cuda (tensor-parallel engines are cpu only)"
    ]


def test_recipe_is_frozen():
    recipe = parse()
    with pytest.raises(ValueError):
        recipe.limits.max_seq_len = 4  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_recipes_plan(path):
    plan = make_plan(load_recipe(path))
    assert plan.memory.num_blocks >= plan.memory.blocks_per_sequence


def test_overrides_set_dotted_keys_with_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "limits": {"max_seq_len": 2048}}))
    recipe = load_recipe(
        path,
        overrides=[
            "quantization.weights=int4",
            "quantization.method=awq",
            "quantization.calibration.seed=3",  # a section the file lacks is created
            "quantization.exclude=[lm_head, 'layers.0.*']",
            "limits.max_seq_len=512",
            "plugins.fused_rope=true",
            "target.cpu=x86-64-v3",
        ],
    )
    q = recipe.quantization
    assert (q.weights, q.method, q.calibration_or_default().seed) == ("int4", "awq", 3)
    assert q.exclude == ("lm_head", "layers.0.*")
    assert recipe.limits.max_seq_len == 512 and recipe.plugins.fused_rope is True
    assert recipe.target.cpu == "x86-64-v3"
    assert yaml.safe_load(path.read_text())["limits"] == {"max_seq_len": 2048}  # the file is left as it was
    assert load_recipe(path, overrides=["limits.max_seq_len=64", "limits.max_seq_len=128"]).limits.max_seq_len == 128


@pytest.mark.parametrize(
    "override,message",
    [
        ("quantization.weightz=int4", "quantization.weightz: unknown key (did you mean 'weights'?"),
        ("quantization.weights=int3", "quantization.weights: must be one of 'none', 'int8', 'int4', 'fp8'"),
        ("limits.max_seq_len=many", "limits.max_seq_len: must be a valid integer"),
        ("limits.max_seq_len=4", "limits.max_seq_len: must be >= 8 (got 4)"),
        ("quantization.weights", "--set 'quantization.weights': expected KEY=VALUE with a dotted key"),
        ("quantization..weights=int4", "expected KEY=VALUE with a dotted key"),
        ("name.first=x", "--set name.first: name is a value ('t'), not a section of keys"),
        ("limits.max_seq_len=[1, 2", "--set limits.max_seq_len: invalid YAML value"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides=[override])
    assert message in str(exc.value) and "\n" not in str(exc.value)
