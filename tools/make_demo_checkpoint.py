#!/usr/bin/env python3
"""Make a small random-weight Hugging Face checkpoint locally (no model hub), for tests and benchmarks:
the demo shape with a trained byte-level BPE tokenizer (llmbuild.testing.checkpoints).

    python tools/make_demo_checkpoint.py --out checkpoints/random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmbuild.testing.checkpoints import make_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    make_checkpoint(args.out, seed=args.seed, initializer_range=0.05)
    info = json.loads((args.out / "config.json").read_text())
    print(
        f"demo checkpoint written to {args.out} ({info['architectures'][0]}, "
        f"{info['num_hidden_layers']} layers, hidden {info['hidden_size']}, vocab {info['vocab_size']})"
    )


if __name__ == "__main__":
    main()
