"""Every Triton kernel the ops launch compiles for Hopper (sm_90) the way AOTInductor launches it, on the CPU.

The interpreter, which runs the kernels' numerics tests here, never compiles them. The first H200 run found two
kinds of kernel that do not compile: one reading a non-constexpr global, one whose math a float argument
turned into fp64 (AOTInductor passes Python floats as fp64, a plain launch as fp32). A subprocess without the
interpreter records each launch of each op (nothing runs: there is no GPU) and compiles it for sm_90 down to
machine code (Triton IR, where both failed, then PTX and ptxas), floats typed fp64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmbuild.plugins import linear_int4, linear_int8, load_plugins
    from llmbuild.plugins.triton import elementwise, lora, ops  # noqa: F401  (registers the ops)
    from llmbuild.plugins.triton import linear_int4 as t_int4, linear_int8 as t_int8, linear_w8a8 as t_w8a8
    from llmbuild.plugins.triton import paged_attention as t_attention
    from tests.helpers import D, make_case, quantized_case

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module in (elementwise, lora, t_int4, t_int8, t_w8a8, t_attention):
        module.wrap_triton = Recorder
    load_plugins()
    T = torch.ops.llmbuild_triton
    bf16 = torch.bfloat16
    x = torch.randn(3, 64, dtype=bf16)
    T.rms_norm(x, torch.ones(64, dtype=bf16), 1e-6)
    T.add_rms_norm(x, x, torch.ones(64, dtype=bf16), 1e-6)
    T.swiglu(torch.randn(3, 128, dtype=bf16))
    T.rope(torch.randn(3, 2, 16, dtype=bf16), torch.arange(3), torch.ones(8, 16), torch.zeros(8, 16))
    args, *_ = make_case(bf16)
    T.paged_attention(*args, D**-0.5)
    for codes in (torch.int8, torch.float8_e4m3fn):
        args, kv_scales, *_ = quantized_case(bf16, codes)
        T.quantized_paged_attention(*args, kv_scales, D**-0.5)
    w, scales = linear_int8.quantize_int8(torch.randn(80, 64), bf16)
    T.linear_int8(x, w, scales, None)
    T.linear_w8a8(x, w, scales, None)
    q, s, m = linear_int4.quantize_int4(torch.randn(80, 128), 32)
    T.linear_int4(torch.randn(3, 128, dtype=bf16), linear_int4.pack_int4(q), s, m, None)
    T.lora(x, torch.randn(3, 48, dtype=bf16), torch.randn(3, 16, 64, dtype=bf16),
           torch.randn(3, 8, 48, dtype=bf16), torch.full((3, 2), 8, dtype=torch.int32),
           torch.tensor([0, 1, 2], dtype=torch.int32), [24, 24])

    TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
             torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
             torch.float8_e4m3fn: "fp8e4nv"}

    def signature(kernel, args, kwargs):
        values = dict(zip(kernel.arg_names, args)) | kwargs
        sig, constexprs = {}, {}
        for p in kernel.params:
            v = values[p.name]
            if p.is_constexpr:
                sig[p.name], constexprs[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + TYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp64"  # as AOTInductor passes a Python float
            else:
                raise TypeError(f"{kernel.fn.__name__}: argument {p.name} = {v!r}")
        return sig, constexprs

    target = GPUTarget("cuda", 90, 32)
    seen = set()
    for kernel, args, kwargs in launches:
        sig, constexprs = signature(kernel, args, kwargs)
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        # all the way to machine code (ptxas, which the triton wheel carries): resource limits fail here too
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=target)
        assert compiled.asm["cubin"], kernel.fn.__name__
    print("compiled", len(seen), "launches of", sorted({k[0] for k in seen}))
    """
)


def test_every_launched_kernel_compiles_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = proc.stdout.split(" of ", 1)[1]
    for name in ("_rms_norm_kernel", "_attention_kernel", "_write_cache_kernel", "_linear_int4_kernel"):
        assert name in kernels, proc.stdout
