"""tools/train_demo_model.py: prose extraction, and the same weights for the same seed."""

from __future__ import annotations

import hashlib
import json
import sys

from tools import train_demo_model
from tools.train_demo_model import prose_paragraphs

RST = """
.. _tut-lists:

*****
Lists
*****

Python knows a number of compound data types, used to group together other values. The most
versatile is the :dfn:`list`, which can be written as a list of :func:`comma-separated <repr>` values.

::

   squares = [1, 4, 9, 16, 25]

* Lists can be indexed and sliced, and they support operations like ``concatenation`` too.

+------+------+
| a    | b    |
+------+------+
"""


def test_only_prose_survives_with_markup_reduced_to_text(tmp_path):
    (tmp_path / "lists.rst.txt").write_text(RST)
    paragraphs = prose_paragraphs(tmp_path)
    assert paragraphs == [
        "Python knows a number of compound data types, used to group together other values. The most versatile "
        "is the list, which can be written as a list of comma-separated values.",
        "Lists can be indexed and sliced, and they support operations like concatenation too.",
    ]


def test_training_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        (docs / f"page{i}.rst.txt").write_text(
            f"Paragraph {i} explains how the interpreter evaluates an expression and returns its value to the "
            f"caller, number {i * 7} of many.\n\nAnother paragraph {i} says that a module is a file of definitions.\n"
        )
    hashes = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        argv = ["train", "--out", str(out), "--docs", str(docs), "--steps", "3", "--batch", "2", "--seq-len", "32"]
        monkeypatch.setattr(sys, "argv", argv)
        train_demo_model.main()
        hashes.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
        report = json.loads((out / "training.json").read_text())
        assert report["steps"] == 3 and report["perplexity"]["validation"] > 1
    assert hashes[0] == hashes[1]
