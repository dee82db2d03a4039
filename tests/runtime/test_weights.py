"""load_weights: the tensors of a safetensors file, copied onto (huge-page advised) anonymous memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmbuild.runtime.weights import ALIGN, load_weights


def test_same_tensors_as_safetensors_each_on_a_cache_line(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),  # 30 bytes: the next tensor would start unaligned
        "int8": torch.randint(-128, 127, (7, 9), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "fp32": torch.randn(2, 2, 2, generator=g),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    loaded = load_weights(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
        if t.numel():
            assert loaded[name].data_ptr() % ALIGN == 0, name
    # a copy: writing to it leaves the file alone
    loaded["fp32"].zero_()
    assert torch.equal(load_file(path)["fp32"], tensors["fp32"])


def test_a_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorError):
        load_weights(path)


def test_loading_holds_the_weights_once(tmp_path):
    """The peak resident set grows by the weights once: the file is read, not mapped and copied."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64 << 20, dtype=torch.uint8), "v": torch.ones(64 << 20, dtype=torch.uint8)}, path)
    script = (
        "import sys, torch\n"
        "from llmbuild.runtime.weights import load_weights\n"
        "hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) << 10\n"
        "before = hwm(); w = load_weights(sys.argv[1]); assert int(w['v'][-1]) == 1\n"
        "print(hwm() - before)\n"
    )
    grown = int(
        subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True).stdout
    )
    assert 128 << 20 <= grown < 160 << 20
