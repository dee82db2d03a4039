#!/usr/bin/env python3
"""Train llmbuild's demo model: a small Llama on the prose of the Python documentation, on a CPU.

Corpus: the reStructuredText sources of the Python 3.11 documentation as Debian ships them
(`apt-get install python3.11-doc` -> /usr/share/doc/python3.11/html/_sources), licensed under the
PSF License Agreement (documentation text: PSF / Zero-Clause BSD, see that package's copyright
file). Only prose paragraphs are kept (no code blocks, directives or tables); markup roles are
reduced to their text. 2% of the paragraphs, picked by the seed, are held out for validation.

Model: LlamaForCausalLM (DEMO_SHAPE of llmbuild/testing/checkpoints.py: ~5M parameters, tied embeddings)
with a byte-level BPE tokenizer trained on the same text; AdamW, warmup + cosine decay, bf16
autocast; deterministic for a seed (one thread order: torch.use_deterministic_algorithms).

    python tools/train_demo_model.py --out demo_model          # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from llmbuild.testing.checkpoints import DEMO_SHAPE, train_tokenizer_on

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
ROLE = re.compile(r":[a-z:+-]+:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")
LITERAL = re.compile(r"``([^`]+)``")
EMPHASIS = re.compile(r"\*\*?([^*]+)\*\*?")
LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_+")


def prose_paragraphs(root: Path) -> list[str]:
    """English paragraphs of the .rst sources under root, in a fixed (sorted) order."""
    out = []
    for path in sorted(root.rglob("*.rst.txt")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            lines = block.splitlines()
            if lines and re.match(r"[*-] \S", lines[0]):  # a bullet item: keep its text
                lines = [lines[0][2:]] + lines[1:]
            if not lines or lines[0][:1].isspace() or lines[0].startswith(("..", "|", "+", "=", "-", "*", ">>>")):
                continue
            if any(set(line.strip()) <= set("=-~^*#+|") for line in lines):
                continue  # section headings and tables
            text = " ".join(line.strip() for line in lines)
            text = LINK.sub(r"\1", ROLE.sub(r"\1", LITERAL.sub(r"\1", text)))
            text = EMPHASIS.sub(r"\1", text).replace("::", ":")
            text = re.sub(r"\s+", " ", text).strip()
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 60 and letters >= 0.8 * len(text):
                out.append(text)
    return out


def split(paragraphs: list[str], seed: int, held_out: float = 0.02) -> tuple[list[str], list[str]]:
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * held_out))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [paragraphs[i] for i in train], [paragraphs[i] for i in val]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream: each paragraph starts with BOS (as prompts will) and ends with EOS."""
    eos = tokenizer.token_to_id("</s>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """exp(mean next-token loss) over consecutive windows of the stream."""
    model.eval()
    seq_len = min(seq_len, len(data) - 1)  # a held-out text shorter than one window is one window
    n = (len(data) - 1) // seq_len
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = range(start, min(start + batch, n))
        x = torch.stack([data[i * seq_len : (i + 1) * seq_len] for i in rows])
        y = torch.stack([data[i * seq_len + 1 : (i + 1) * seq_len + 1] for i in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.docs.is_dir():
        sys.exit(f"{args.docs} not found: install the corpus with `apt-get install python3.11-doc`")

    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train_text, val_text = split(prose_paragraphs(args.docs), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_tokenizer_on(args.out, train_text, DEMO_SHAPE["vocab_size"])
    tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    train, val = token_stream(tok, train_text), token_stream(tok, val_text)
    print(
        f"corpus: {len(train_text)} train / {len(val_text)} validation paragraphs, {len(train)} / {len(val)} tokens",
        flush=True,
    )

    config = LlamaConfig(**DEMO_SHAPE, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        offsets = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([train[o : o + args.seq_len] for o in offsets])
        y = torch.stack([train[o + 1 : o + args.seq_len + 1] for o in offsets])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - start:6.0f} s",
                flush=True,
            )

    val_ppl = perplexity(model, val, args.seq_len)
    train_ppl = perplexity(model, train[: len(val)], args.seq_len)
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "validation.txt").write_text("\n\n".join(val_text) + "\n", encoding="utf-8")
    report = {
        "params": params,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "train_tokens_seen": args.steps * args.batch * args.seq_len,
        "corpus_tokens": {"train": len(train), "validation": len(val)},
        "perplexity": {"validation": val_ppl, "train_sample": train_ppl, "computed_with": "bf16 autocast"},
        "train_seconds": round(time.time() - start),
        "torch": torch.__version__,
        "corpus": "Python 3.11 documentation prose (Debian python3.11-doc, PSF License)",
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
