#!/usr/bin/env python3
"""Which AOTInductor packaging of a cuda step graph loads on this GPU.

On the first H200 run (issue 26; torch 2.11, triton 3.6) every compiled cuda engine built, then crashed the
process (SIGSEGV) inside AOTIModelPackageLoader when loaded, while the same graphs ran eagerly and matched
transformers. This builds the tests' tiny step graph for cuda and packages it in several ways, each loaded (then run
for one prefill step, against the exported program) in its own process (a crash ends only that one), so that
one short device call tells which part of our packaging the loader trips on:

- ours: the builder's own compile_graph (weights out of the .so, every tensor a constant, Inductor's fixed working
  directory, the archive rewritten by compile._normalize); ours-by-hand: the same configs and rewrite, called directly;
- no-normalize: the same, the archive as AOTInductor wrote it;
- inline-small: ours as it was on the first H200 run, without always_keep_tensor_constants (Inductor inlines small
  tensors, which then leave the constant list);
- weights-in-so: AOTInductor's defaults (the zero weights compiled into the .so);
- weights-on-disk: weights out of the .so, into the archive (package_constants_on_disk_format=binary_blob);
- single-threaded: ours, loaded with run_single_threaded=True (what upstream advises next to CUDA graphs);
- control-linear / control-linear-no-weights: one nn.Linear, no llmbuild op, Triton kernel or rewrite, packaged
  with AOTInductor's defaults / with its weight out of the .so: if these crash too, the environment (toolchain,
  torch 2.11's loader) does, not our graphs.

    python bench/gpu_probe_aoti.py [--gdb]   every variant, then a table; --gdb: a crash's native backtrace
                                            (cuda-gdb, which the GPU image has)
    python bench/gpu_probe_aoti.py VARIANT   one variant (what the table runs)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # llmbuild, and the tests' tiny model (tests/helpers.py)
from llmbuild.builder.compile import INDUCTOR_CONFIGS  # noqa: E402

VARIANTS = {
    # first the controls: if even these crash, the environment does (the rest would not tell more)
    "control-linear": ({}, False),
    "control-linear-no-weights": ({"aot_inductor.package_constants_in_so": False}, False),
    "ours": None,  # builder/compile.compile_graph itself: its configs, fixed working directory and _normalize
    "ours-by-hand": (INDUCTOR_CONFIGS, True),
    "no-normalize": (INDUCTOR_CONFIGS, False),
    "inline-small": ({"aot_inductor.package_constants_in_so": False}, True),
    "weights-in-so": ({}, False),
    "weights-on-disk": ({**INDUCTOR_CONFIGS, "aot_inductor.package_constants_on_disk_format": "binary_blob"}, False),
    "single-threaded": None,  # ours, loaded with run_single_threaded=True
}


def run_control(name: str, device: str) -> None:
    """One nn.Linear through AOTInductor alone: packaged, loaded, (weights handed over,) run, compared."""
    import torch

    linear = torch.nn.Linear(64, 32).to(device)
    x = torch.randn(4, 64, device=device)
    program = torch.export.export(linear, (x,))
    workdir = Path(tempfile.mkdtemp(prefix=f"probe-{name}-"))
    path = workdir / "model.pt2"
    configs, _ = VARIANTS[name]
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    print(f"{name}: packaged, {path.stat().st_size} bytes", flush=True)
    package = torch._inductor.aoti_load_package(str(path))
    print(f"{name}: loaded", flush=True)
    if configs:
        weights = dict(linear.state_dict())
        names = package.get_constant_fqns()
        package.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    with torch.no_grad():
        diff = (package(x) - linear(x)).abs().max().item()
    print(f"{name}: ran, max |difference| against eager {diff:.2e}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


def run_variant(name: str, device: str) -> None:
    """Build, package, load and hand the weights to the tiny step graph; print what got done."""
    if name.startswith("control-"):
        run_control(name, device)
        return
    import torch
    from torch.export.passes import move_to_device_pass

    from llmbuild.builder.compile import _normalize, compile_graph
    from llmbuild.builder.export import export_graph
    from llmbuild.builder.retarget import retarget
    from llmbuild.cpu_target import resolve
    from llmbuild.plugins import load_plugins
    from llmbuild.runtime.graph import dense_inputs
    from tests.helpers import LIMITS, tiny_model

    load_plugins()
    model = tiny_model()
    program = retarget(export_graph(model, LIMITS, 4, torch.float32), device)
    if device != "cpu":
        program = move_to_device_pass(program, torch.device(device, torch.cuda.current_device()))
    workdir = Path(tempfile.mkdtemp(prefix=f"probe-{name}-"))
    path = workdir / "model.pt2"
    start = time.perf_counter()
    variant = VARIANTS[name]
    if variant is None:  # ours, single-threaded
        compile_graph(program, path, resolve("native"))
    else:
        configs, normalize = variant
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        if normalize:
            _normalize(path)
    print(f"{name}: packaged in {time.perf_counter() - start:.1f} s, {path.stat().st_size} bytes", flush=True)
    package = torch._inductor.aoti_load_package(str(path), run_single_threaded=name == "single-threaded")
    print(f"{name}: loaded", flush=True)
    weights = {k: v.to(device) for k, v in model.state_dict().items()}
    names = package.get_constant_fqns()
    package.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    print(f"{name}: {len(names)} weights handed over (user-managed)", flush=True)
    step, caches = prefill_step(device)
    out = package.loader.boxed_run(dense_inputs(step, caches))[0]
    eager_caches = [torch.zeros_like(c) for c in caches]
    with torch.no_grad():
        module = program.module()
        module.load_state_dict(weights, strict=True, assign=True)
        expected = module(*step, eager_caches)
    diff = (out.float() - expected.float()).abs().max().item()
    print(f"{name}: ran a prefill step, max |logit difference| against the exported program {diff:.2e}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


def prefill_step(device: str) -> tuple[tuple, list]:
    """Two prompts (5 and 3 tokens) of the tiny model, in blocks 0-1 and 2-3 of a zeroed cache (block size 4)."""
    import torch

    from tests.helpers import CFG, LIMITS

    tables = torch.zeros(2, LIMITS.max_seq_len // 4, dtype=torch.int32)
    tables[:, :2] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    step = (
        torch.randint(0, CFG.vocab_size, (8,), generator=torch.Generator().manual_seed(1)),
        torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
        torch.tensor([0, 1, 2, 3, 4, 8, 9, 10]),
        tables,
        torch.tensor([5, 3], dtype=torch.int32),
        torch.tensor([0, 5, 8], dtype=torch.int32),
        torch.tensor([4, 7]),
        torch.zeros(8, dtype=torch.int32),  # no LoRA adapter
    )
    caches = [torch.zeros(8, CFG.num_kv_heads, 4, CFG.head_dim, device=device) for _ in range(2 * CFG.num_layers)]
    return tuple(t.to(device) for t in step), caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", nargs="?", choices=sorted(VARIANTS))
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of this script without a GPU)")
    ap.add_argument("--gdb", action="store_true", help="rerun a crashed variant under cuda-gdb for its backtrace")
    args = ap.parse_args()
    if args.variant:
        run_variant(args.variant, args.device)
        return
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, name, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        rows.append((name, proc.returncode, last))
        print(f"--- {name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr[-3000:]}", flush=True)
        if proc.returncode < 0 and args.gdb and shutil.which("cuda-gdb"):
            gdb = ["cuda-gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", *cmd]
            trace = subprocess.run(gdb, capture_output=True, text=True)
            print(f"--- {name} under cuda-gdb\n{trace.stdout[-6000:]}{trace.stderr[-2000:]}", flush=True)
    print("\n| variant | exit | last step |\n| --- | --- | --- |")
    for name, code, last in rows:
        print(f"| {name} | {code} | {last} |")


if __name__ == "__main__":
    main()
