"""The op library shared by builder and runtime (as TensorRT plugins are).

Each op has a schema and CPU kernel in csrc/ (a C++ TORCH_LIBRARY, so a compiled engine needs no
Python to run it), a torch reference and a fake (shape) kernel in the op's module here, and a test
comparing kernel and reference. Model graphs call the ops by name (`torch.ops.llmbuild.<op>`); an
engine's manifest records each op's version and the runtime refuses an engine whose versions differ.

Call `load_plugins()` before tracing or running a graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmbuild.cpu_target import resolve
from llmbuild.plugins import (
    linear,
    linear_fp8,
    linear_int4,
    linear_int8,
    linear_w8a8,
    lora,
    paged_attention,
    rms_norm,
    rope,
    swiglu,
)
from llmbuild.plugins.library import build_library, load_library, loaded_library

OP_VERSIONS: dict[str, int] = {
    paged_attention.OP_NAME: paged_attention.VERSION,
    paged_attention.QUANTIZED_OP_NAME: paged_attention.QUANTIZED_VERSION,
    linear.OP_NAME: linear.VERSION,
    linear_int8.OP_NAME: linear_int8.VERSION,
    linear_int4.OP_NAME: linear_int4.VERSION,
    linear_fp8.OP_NAME: linear_fp8.VERSION,
    linear_w8a8.OP_NAME: linear_w8a8.VERSION,
    rms_norm.OP_NAME: rms_norm.VERSION,
    rms_norm.ADD_OP_NAME: rms_norm.VERSION,
    rope.OP_NAME: rope.VERSION,
    swiglu.OP_NAME: swiglu.VERSION,
    lora.OP_NAME: lora.VERSION,
}

_MODULES = (paged_attention, linear, linear_int8, linear_int4, linear_fp8, linear_w8a8, rms_norm, rope, swiglu, lora)
_registered = False


def load_plugins(library: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Load the C++ op library and register the ops' fake kernels; returns the library serving the process.

    `library`: an engine's sealed copy. Without one (builder, tests), this machine's `native` build,
    compiled once into the cache. A process keeps the first library it loaded.
    """
    global _registered
    if library is None and loaded_library() is None:
        library = build_library(resolve("native"), cache_dir)
    path = load_library(library) if library is not None else loaded_library()
    assert path is not None
    if not _registered:
        for module in _MODULES:
            # an engine built before an op existed seals a library without it (its graph does not call it)
            if torch._C._dispatch_has_kernel(module.OP_NAME):
                module.register_fake_kernel()
        _registered = True
    return path
