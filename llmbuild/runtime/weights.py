"""Read a rank's safetensors file into memory backed by transparent huge pages.

A decode step streams every weight once, so the TLB walks 4 KiB pages through gigabytes per token;
2 MiB pages spare most of those walks. `load_weights` reads the file's tensors straight into one
anonymous mapping advised with MADV_HUGEPAGE. Measured on the 2-core AVX512 machine, TinyLlama-shaped
matrices at batch 1, interleaved in one process: bf16 10%, int8 6%, int4 3% faster, for one copy at load
(0.5 s for 2 GB when the OS has free huge pages, a few seconds when it must compact memory first).
NOTE: reading, not mapping the file and copying: a mapped file's pages count in the process's resident
set until it is unmapped, so copying out of a mapping peaks at twice the weights (the figure
`llmbuild plan` sizes an engine by is the weights once).
Where the OS has no such advice (not Linux), the file's mapping is used as it is. A cuda engine's
weights go straight to the GPU.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes: each tensor starts on a cache line
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def load_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on `device`; in CPU memory, on huge pages where the OS offers them."""
    if device != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return load_file(path, device=device)
    with open(path, "rb") as f:
        header, data_start = _header(f)
        if data_start + max((end for _, (_, end) in _offsets(header)), default=0) != os.fstat(f.fileno()).st_size:
            raise SafetensorError(f"{path}: file size does not match its header (truncated or extended)")
        sizes = {name: -(-(end - begin) // ALIGN) * ALIGN for name, (begin, end) in _offsets(header)}
        length = max(-(-sum(sizes.values()) // HUGE_PAGE) * HUGE_PAGE, HUGE_PAGE)
        # private: anonymous shared memory gets no transparent huge pages
        region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the pages fault in huge
        view, weights, at = memoryview(region), {}, 0
        for name, (begin, end) in _offsets(header):
            dtype, shape = _DTYPES.get(header[name]["dtype"]), header[name]["shape"]
            if dtype is None or math.prod(shape) * dtype.itemsize != end - begin:
                raise SafetensorError(f"{path}: tensor {name} has a dtype or shape that does not match its bytes")
            if end == begin:
                weights[name] = torch.empty(shape, dtype=dtype)
                continue
            f.seek(data_start + begin)
            f.readinto(view[at : at + end - begin])
            flat = torch.frombuffer(region, dtype=torch.uint8, count=end - begin, offset=at)
            weights[name] = flat.view(dtype).view(shape)
            at += sizes[name]
    return weights


def _header(f: BinaryIO) -> tuple[dict, int]:
    """A safetensors file's tensor table (metadata dropped) and where its data starts."""
    try:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as exc:
        raise SafetensorError(f"invalid safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _offsets(header: dict) -> list[tuple[str, tuple[int, int]]]:
    """(name, (begin, end)) of every tensor, in file order (reads run forward through the file)."""
    items = [(name, (int(t["data_offsets"][0]), int(t["data_offsets"][1]))) for name, t in header.items()]
    return sorted(items, key=lambda item: item[1][0])
