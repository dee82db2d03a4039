#!/usr/bin/env python3
"""Write llmbuild's built-in calibration text (llmbuild/data/calibration.txt) for AWQ / GPTQ.

Paragraphs of the demo model's training split (the Python 3.11 documentation prose of Debian's
python3.11-doc, PSF License; see tools/train_demo_model.py), shuffled by a fixed seed, up to a size
budget: calibration text from the training distribution, disjoint from the held-out text the
quality gate evaluates on (llmbuild/data/heldout.txt).

    python tools/make_calibration_text.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tools/
from tools.train_demo_model import DOCS, prose_paragraphs, split  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "llmbuild" / "data" / "calibration.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--max-bytes", type=int, default=320_000)
    ap.add_argument("--seed", type=int, default=0, help="the demo model's training seed (the same split)")
    args = ap.parse_args()
    if not args.docs.is_dir():
        sys.exit(f"{args.docs} not found: install the corpus with `apt-get install python3.11-doc`")
    train, held_out = split(prose_paragraphs(args.docs), args.seed)
    train = [p for p in train if p not in set(held_out)]  # the docs repeat a few paragraphs verbatim
    random.Random(args.seed + 1).shuffle(train)
    chosen, size = [], 0
    for paragraph in train:
        if size + len(paragraph) + 2 > args.max_bytes:
            break
        chosen.append(paragraph)
        size += len(paragraph) + 2
    args.out.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(chosen)} paragraphs, {size} bytes")


if __name__ == "__main__":
    main()
