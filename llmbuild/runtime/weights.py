"""Read a rank's safetensors file into memory backed by transparent huge pages.

A decode step streams every weight once, so the TLB walks 4 KiB pages through gigabytes per token;
2 MiB pages spare most of those walks. safetensors' `load_file` maps the file (4 KiB page-cache
pages, zero copy); `load_weights` copies the tensors into one anonymous mapping advised with
MADV_HUGEPAGE. Measured on the 2-core AVX512 machine, TinyLlama-shaped matrices at batch 1,
interleaved in one process: bf16 10%, int8 6%, int4 3% faster, for one copy at load (0.5 s for
2 GB when the OS has free huge pages, a few seconds when it must compact memory first).
Where the OS has no such advice (not Linux), the file's mapping is used as it is. A cuda engine's
weights go straight to the GPU.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from safetensors.torch import load_file

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes: each tensor starts on a cache line


def load_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on `device`; in CPU memory, on huge pages where the OS offers them."""
    if device != "cpu":
        return load_file(path, device=device)
    mapped = load_file(path)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return mapped
    sizes = {name: -(-t.numel() * t.element_size() // ALIGN) * ALIGN for name, t in mapped.items()}
    length = max(-(-sum(sizes.values()) // HUGE_PAGE) * HUGE_PAGE, HUGE_PAGE)
    # private: anonymous shared memory gets no transparent huge pages
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the pages fault in huge
    weights, at = {}, 0
    for name, t in mapped.items():
        if t.numel() == 0:
            weights[name] = t.clone()
            continue
        flat = torch.frombuffer(region, dtype=torch.uint8, count=t.numel() * t.element_size(), offset=at)
        weights[name] = flat.view(t.dtype).view(t.shape).copy_(t)
        at += sizes[name]
    return weights
