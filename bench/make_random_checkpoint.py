#!/usr/bin/env python3
"""Random-weight Llama checkpoints of the benchmark shapes.

`tinyllama` (default): the TinyLlama-1.1B shape of DESIGN.md's CPU benchmarks: hidden 2048, 22 layers,
32 heads / 4 kv heads, ffn 5632, vocab 32000. `llama3-8b`: the Llama-3-8B shape of the GPU benchmarks
(issue 6): hidden 4096, 32 layers, 32 heads / 8 kv heads, ffn 14336, vocab 128256, RoPE theta 500000.
`llama3-1b`: the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 / 8 heads, ffn 8192, the same vocabulary; its
embeddings untied here), the GPU shape that builds in a minute, measured before the 8B one.
bf16, N(0, 0.02) matrices and unit norms from a seeded generator (the same recipe as
../shared/peers/make_checkpoint.py), plus the small local BPE tokenizer of llmbuild/testing/checkpoints.py
(benchmarks feed token ids directly).

    python bench/make_random_checkpoint.py --out checkpoints/tinyllama-1.1b-random
    python bench/make_random_checkpoint.py --shape llama3-8b --out checkpoints/llama3-8b-random --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig

from llmbuild.testing.checkpoints import train_tokenizer

COMMON = dict(rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHAPES = {
    "tinyllama": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        **COMMON,
    ),
    "llama3-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        **COMMON,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        **COMMON,
    ),
}


def make(
    out: Path, shape_name: str = "tinyllama", seed: int = 0, std: float = 0.02, layers: int | None = None,
    device: str = "cpu",
) -> None:  # fmt: skip
    """Write the checkpoint; `layers` overrides the shape's depth (a quick smoke test), `device` draws
    the weights there (cuda: seconds for 8B parameters instead of minutes)."""
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab_size=4096)
    shape = dict(SHAPES[shape_name])
    layers = layers or shape["num_hidden_layers"]
    shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    g = torch.Generator(device=device).manual_seed(seed)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d

    def rnd(*size: int) -> torch.Tensor:
        return torch.empty(size, device=device).normal_(0.0, std, generator=g).to(torch.bfloat16).cpu()

    sd = {"model.embed_tokens.weight": rnd(v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        sd[p + "self_attn.q_proj.weight"] = rnd(h, h)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd["lm_head.weight"] = rnd(v, h)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="fewer than the shape's for a quick smoke test")
    ap.add_argument("--device", default="cpu", help="where to draw the weights (cuda is much faster for 8B)")
    args = ap.parse_args()
    make(args.out, args.shape, args.seed, layers=args.layers, device=args.device)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
