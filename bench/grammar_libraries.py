"""Grammar libraries for structured output, compared on this machine: llguidance vs xgrammar (issue 21, item 1).

Measures, for each library and for two vocabularies (models/demo's 4096-token byte-level BPE and the
32000-token tokenizer of checkpoints/tinyllama-1.1b-random, made by bench/make_random_checkpoint.py):

- tokenizer set-up time (LLTokenizer / TokenizerInfo from the HF tokenizer);
- grammar compile time (grammar -> something a matcher starts from) on a typical and a large JSON schema,
  json_object, a regex, a choice and a Lark grammar; the first mask (where a library compiles lazily);
- per-token mask time: a valid document is tokenized and walked through the matcher, filling the next-token
  bitmask before each token (timed) and accepting it; median / p99 per step, cold (the first matcher of a
  freshly compiled grammar) and warm (later matchers of the same compiled grammar);
- RSS growth of the worker process (and xgrammar's own CompiledGrammar.memory_size_bytes);
- JSON-schema keyword coverage: each keyword's schema is compiled, then a valid and an invalid instance are
  fed token by token: refused / enforced / ignored (accepts the invalid instance) / rejects the valid one;
- pathological inputs (deep nesting, a 10k enum, catastrophic regexes, an ambiguous CFG, a huge maxLength),
  each in its own subprocess with a 30 s timeout: time to compile or to error, walk time, hang or crash;
- whether compilation holds the GIL (a counting thread's progress while another thread compiles);
- torch bitmask application on CPU logits [1, 32000] and [16, 32000] fp32.

Every measurement runs in a subprocess of this script (`--worker SPEC`) with one thread for torch/OpenMP
and xgrammar's max_threads=1, so one result cannot disturb the next and nothing can hang the run.

Run in its own venv (not the project's; see the report for versions):

    python3 -m venv /work/scratch/grammar-venv
    /work/scratch/grammar-venv/bin/pip install llguidance xgrammar transformers tokenizers torch==2.13.0
    /work/scratch/grammar-venv/bin/python bench/grammar_libraries.py

Writes bench/results/grammar-libraries.json and .md (`--render` re-renders the .md from the .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKENIZERS = {
    "demo-4096": ROOT / "models" / "demo",
    "tinyllama-32000": ROOT / "checkpoints" / "tinyllama-1.1b-random",
}
LIBS = ("llguidance", "xgrammar")
PATHO_TIMEOUT_S = 30.0
CASE_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------------------------
# Grammars and the documents walked through them


def typical_schema() -> dict:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "role": {"type": "string", "enum": ["admin", "editor", "viewer", "guest"]},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "postcode": {"type": "string"},
                    "country": {"type": "string", "enum": ["FR", "DE", "GB", "US", "JP"]},
                },
                "required": ["street", "city", "country"],
            },
            "tags": {"type": "array", "items": {"type": "string"}},
            "notes": {"type": "string"},
        },
        "required": ["id", "name", "role", "active", "address", "tags"],
    }


def typical_doc() -> dict:
    return {
        "id": 4217,
        "name": "Ada Lovelace",
        "role": "editor",
        "active": True,
        "score": 87.25,
        "address": {
            "street": "12 Analytical Engine Road",
            "city": "London",
            "postcode": "NW1 6XE",
            "country": "GB",
        },
        "tags": ["mathematics", "computing", "poetry", "notes", "engines", "history"],
        "notes": (
            "Wrote the first published algorithm intended for a machine, described how the engine could "
            "manipulate symbols beyond numbers, and translated the memoir of the Italian engineer with "
            "extensive notes of her own that were three times longer than the original article."
        ),
    }


ENUM200 = [f"option_{i:03d}" for i in range(200)]


def _level(depth: int) -> dict:
    """A nested object, `depth` levels deep, each level with a few scalar fields."""
    props = {
        "label": {"type": "string"},
        "count": {"type": "integer"},
        "kind": {"type": "string", "enum": ["alpha", "beta", "gamma", "delta"]},
    }
    if depth > 1:
        props["child"] = _level(depth - 1)
    return {"type": "object", "properties": props, "required": list(props)}


def _level_doc(depth: int) -> dict:
    d = {"label": f"level {depth}", "count": depth * 11, "kind": "gamma"}
    if depth > 1:
        d["child"] = _level_doc(depth - 1)
    return d


def large_schema() -> dict:
    """64 properties: scalars, 200-value enums, anyOf, arrays, nested objects 4 deep; half of them required."""
    props: dict = {}
    for i in range(64):
        k = i % 8
        name = f"field_{i:02d}"
        if k == 0:
            props[name] = {"type": "string"}
        elif k == 1:
            props[name] = {"type": "integer"}
        elif k == 2:
            props[name] = {"type": "string", "enum": ENUM200}
        elif k == 3:
            props[name] = {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
        elif k == 4:
            props[name] = {"type": "array", "items": {"type": "string"}}
        elif k == 5:
            props[name] = _level(4)
        elif k == 6:
            props[name] = {"type": "boolean"}
        else:
            props[name] = {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "integer"}}]}
    required = [n for j, n in enumerate(props) if j % 2 == 0]
    return {"type": "object", "properties": props, "required": required}


def large_doc() -> dict:
    # every required field, and the optional ones of the first 16 fields: ~800 tokens at 32k
    d: dict = {}
    for i in range(64):
        k = i % 8
        if i % 2 == 1 and i >= 16:
            continue
        name = f"field_{i:02d}"
        if k == 0:
            d[name] = f"text {i}"
        elif k == 1:
            d[name] = i * 7
        elif k == 2:
            d[name] = ENUM200[(i * 37) % 200]
        elif k == 3:
            d[name] = None if i % 3 else "x"
        elif k == 4:
            d[name] = ["a", "b"]
        elif k == 5:
            d[name] = _level_doc(4)
        elif k == 6:
            d[name] = i % 4 == 0
        else:
            d[name] = [1, 2, 3]
    return d


def any_json_doc() -> dict:
    return {
        "query": "weather in Paris",
        "results": [
            {"date": "2024-06-01", "high": 24.5, "low": 14.0, "conditions": ["sunny", "windy"], "rain": None},
            {"date": "2024-06-02", "high": 21.0, "low": 13.5, "conditions": ["cloudy"], "rain": 0.4},
            {"date": "2024-06-03", "high": 19.5, "low": 12.0, "conditions": ["rain", "storms"], "rain": 12.7},
        ],
        "units": {"temperature": "celsius", "rain": "millimetres"},
        "source": {"name": "Example Meteorological Office", "verified": True, "stations": [7149, 7150, 7157]},
        "summary": "Warm at first, then cooler and wetter with thunderstorms expected by the third day.",
    }


def arithmetic_doc() -> str:
    parts = []
    for i in range(24):
        a, b, c = 3 + i * 7, 11 + i * 5, 2 + i % 9
        parts.append(f"({a}+{b})*{c}" if i % 3 else f"-({a}.5/{b}-{c})")
    return "+".join(parts)


LARK_ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]+(\.[0-9]+)?/
"""

EMAIL_RE = r"[a-z0-9._%+-]{1,64}@[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63}){0,4}\.[a-z]{2,10}"
CHOICES = ["positive", "negative", "neutral", "mixed", "not applicable"]


def grammar_cases() -> dict:
    """name -> (kind, spec, document text)."""
    return {
        "typical_schema": ("json_schema", typical_schema(), json.dumps(typical_doc())),
        "large_schema": ("json_schema", large_schema(), json.dumps(large_doc())),
        "json_object": ("json_object", None, json.dumps(any_json_doc())),
        "regex_email": ("regex", EMAIL_RE, "grace.hopper.1906@navy-research.example.org"),
        "choice_5": ("choice", CHOICES, "not applicable"),
        "lark_arith": ("lark", LARK_ARITH, arithmetic_doc()),
    }


def _nested(depth: int) -> dict:
    s: dict = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"c": s}, "required": ["c"]}
    return s


def _nested_doc(depth: int) -> str:
    return '{"c": ' * depth + "7" + "}" * depth


def patho_cases() -> dict:
    import random

    rnd = random.Random(0)
    ab = "".join(rnd.choice("ab") for _ in range(60)) + "a" + "".join(rnd.choice("ab") for _ in range(20))

    def many_optional(n: int) -> dict:
        return {"type": "object", "properties": {f"p{i:03d}": {"type": "integer"} for i in range(n)}}

    any_of_objects = {
        "anyOf": [
            {
                "type": "object",
                "properties": {f"k{j}_{i}": {"type": "string"} for i in range(20)},
                "required": [f"k{j}_0"],
            }
            for j in range(50)
        ]
    }
    return {
        "deep_nesting_60": ("json_schema", _nested(60), _nested_doc(60)),
        "deep_nesting_100": ("json_schema", _nested(100), _nested_doc(100)),
        "deep_nesting_300": ("json_schema", _nested(300), _nested_doc(300)),
        "deep_nesting_1000": ("json_schema", _nested(1000), _nested_doc(1000)),
        "enum_10k": (
            "json_schema",
            {"type": "string", "enum": [f"value_{i:05d}" for i in range(10000)]},
            json.dumps("value_04242"),
        ),
        "regex_(a|aa)*b": ("regex", "(a|aa)*b", "a" * 80 + "b"),
        "regex_(x+x+)+y": ("regex", "(x+x+)+y", "x" * 80 + "y"),
        "regex_[ab]*a[ab]{20}": ("regex", "[ab]*a[ab]{20}", ab),
        "regex_(a{1,100}){1,100}": ("regex", "(a{1,100}){1,100}", "a" * 120),
        "schema_pattern_(a|aa)*b": (
            "json_schema",
            {"type": "string", "pattern": "^(a|aa)*b$"},
            json.dumps("a" * 80 + "b"),
        ),
        "schema_maxLength_100000": ("json_schema", {"type": "string", "maxLength": 100000}, json.dumps("word " * 40)),
        "lark_ambiguous_cfg": ("lark", 'start: s\ns: s s | "x"\n', "x" * 60),
        "optional_properties_100": ("json_schema", many_optional(100), json.dumps({"p007": 1, "p050": 2, "p099": 3})),
        "optional_properties_300": ("json_schema", many_optional(300), json.dumps({"p007": 1, "p150": 2, "p299": 3})),
        "optional_properties_600": ("json_schema", many_optional(600), json.dumps({"p007": 1, "p150": 2, "p599": 3})),
        "anyOf_50_objects_x_20_props": ("json_schema", any_of_objects, json.dumps({"k49_0": "a", "k49_19": "b"})),
        "array_minItems_1000_maxItems_5000": (
            "json_schema",
            {"type": "array", "items": {"type": "integer"}, "minItems": 1000, "maxItems": 5000},
            json.dumps(list(range(1000))),
        ),
        "regex_[a-z]{1,5000}": ("regex", "[a-z]{1,5000}", "abcdefghij" * 30),
    }


# JSON-schema keyword coverage: name -> (schema, valid instance, invalid instance or None)
COVERAGE = {
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "ABC-1234", "abc-12"),
    "format: date-time": ({"type": "string", "format": "date-time"}, "2024-01-15T10:20:30Z", "yesterday"),
    "format: date": ({"type": "string", "format": "date"}, "2024-01-15", "15/01/2024"),
    "format: email": ({"type": "string", "format": "email"}, "ada@example.com", "not an email"),
    "format: uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "1234"),
    "format: uri": ({"type": "string", "format": "uri"}, "https://example.com/a", "not a uri"),
    "minLength/maxLength": ({"type": "string", "minLength": 3, "maxLength": 5}, "abcd", "ab"),
    "minimum/maximum (integer)": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    "minimum/maximum (number)": ({"type": "number", "minimum": 1.5, "maximum": 2.5}, 2.0, 3.5),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, 7),
    "required": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
        {"a": 1, "b": 2},
        {"a": 1},
    ),
    "additionalProperties: false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    "additionalProperties: schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"x": 1},
        {"x": "s"},
    ),
    "additionalProperties absent (extra key is valid)": (
        {"type": "object", "properties": {"a": {"type": "integer"}}},
        {"a": 1, "b": 2},
        {"a": "x"},
    ),
    "$ref/$defs": (
        {
            "$defs": {"pos": {"type": "integer", "minimum": 0}},
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/pos"}},
            "required": ["p"],
        },
        {"p": 3},
        {"p": "x"},
    ),
    "definitions (draft-7 $ref)": (
        {
            "definitions": {"pos": {"type": "integer"}},
            "type": "object",
            "properties": {"p": {"$ref": "#/definitions/pos"}},
            "required": ["p"],
        },
        {"p": 3},
        {"p": "x"},
    ),
    "recursive $ref": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "children": [{"v": 2, "children": []}]},
        {"v": 1, "children": [{"v": "x"}]},
    ),
    "remote $ref": ({"$ref": "https://example.com/schema.json"}, 1, None),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, "abc", True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, 3, "x"),
    "allOf": (
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    "not": ({"not": {"type": "string"}}, 3, "x"),
    "if/then/else": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}},
            "then": {"required": ["a"]},
        },
        {"a": 1},
        None,
    ),
    "type: [string, null]": ({"type": ["string", "null"]}, None, 3),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "enum (mixed types)": ({"enum": ["a", 1, None]}, None, "b"),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        ["a", 1],
    ),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, [1, 5], [1, 2]),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
        {"x_a": 1},
        {"y": 1},
    ),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"abc": 1}, {"ABC": 1}),
    "minProperties": ({"type": "object", "minProperties": 1}, {"a": 1}, {}),
    "dependentRequired": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        {"a": 1, "b": 2},
        {"a": 1},
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs in a subprocess)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _maxrss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _pct(xs: list, q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def _stats_us(ns: list) -> dict:
    us = [x / 1000.0 for x in ns]
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": _pct(us, 0.99),
        "max_us": max(us),
        "mean_us": statistics.fmean(us),
    }


class Lib:
    """A uniform face over the two libraries: compile(kind, spec) -> compiled; matcher(compiled) -> m."""

    def __init__(self, lib: str, tok_dir: Path, **opts):
        import torch
        import transformers

        torch.set_num_threads(1)
        self.name = lib
        self.hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        self.eos = self.hf.eos_token_id
        t0 = time.perf_counter()
        if lib == "llguidance":
            import llguidance
            import llguidance.hf
            import llguidance.torch

            self.llg = llguidance
            self.tok = llguidance.hf.from_tokenizer(self.hf)
            self.vocab = self.tok.vocab_size
            self.limits = llguidance.LLParserLimits() if opts.get("limits") else None
        else:
            import xgrammar as xgr

            self.xgr = xgr
            self.tok = xgr.TokenizerInfo.from_huggingface(self.hf)
            self.vocab = self.tok.vocab_size
            self.dynamic = bool(opts.get("dynamic", False))
            self.strict = bool(opts.get("strict", True))
            self.cache = bool(opts.get("cache", False))
            self.compiler = self.new_compiler()
        self.tokenizer_setup_s = time.perf_counter() - t0

    def new_compiler(self):
        return self.xgr.GrammarCompiler(
            self.tok, max_threads=1, cache_enabled=self.cache, enable_dynamic_compilation=self.dynamic
        )

    # -- compile: returns an object to start matchers from, or raises
    def compile(self, kind: str, spec, fresh: bool = True):
        if self.name == "llguidance":
            M = self.llg.LLMatcher
            if kind == "json_schema":
                g = M.grammar_from_json_schema(spec)
            elif kind == "json_object":
                g = M.grammar_from_json_schema({"type": "object"})
            elif kind == "regex":
                g = M.grammar_from_regex(spec)
            elif kind == "choice":
                g = self.llg.grammar_from("choice", json.dumps(spec))
            elif kind == "lark":
                g = M.grammar_from_lark(spec)
            else:
                raise ValueError(kind)
            kw = {"log_level": 0}
            if self.limits is not None:
                kw["limits"] = self.limits
            m = M(self.tok, g, **kw)
            if m.is_error():
                raise RuntimeError(m.get_error())
            return m  # the "compiled grammar" of llguidance is a matcher in its start state; deep_copy() it
        c = self.new_compiler() if fresh else self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(spec, strict_mode=self.strict)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        if kind == "lark":
            return c.compile_lark(spec)
        raise ValueError(kind)

    def matcher(self, compiled):
        if self.name == "llguidance":
            return compiled.deep_copy()
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch: int = 1):
        if self.name == "llguidance":
            return self.llg.torch.allocate_token_bitmask(batch, self.vocab)
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, bm, i: int = 0) -> None:
        if self.name == "llguidance":
            self.llg.torch.fill_next_token_bitmask(m, bm, i)
        else:
            m.fill_next_token_bitmask(bm, i)

    def accept(self, m, t: int) -> bool:
        if self.name == "llguidance":
            return m.consume_token(t)
        return m.accept_token(t)

    def error(self, m) -> str:
        if self.name == "llguidance" and m.is_error():
            return m.get_error()
        return ""

    def complete(self, m) -> bool:
        if self.name == "llguidance":
            return m.is_accepting()
        return m.is_completed()

    def encode(self, text: str) -> list:
        return self.hf.encode(text, add_special_tokens=False)


def _walk(lib: Lib, m, ids: list, bm) -> dict:
    """Fill the mask before each token (timed), check the token is allowed, accept it; then the final mask."""
    fill_ns, accept_ns, allowed = [], [], []
    row = bm[0]
    for t in ids + [None]:
        t0 = time.perf_counter_ns()
        lib.fill(m, bm, 0)
        t1 = time.perf_counter_ns()
        fill_ns.append(t1 - t0)
        allowed.append(int(sum(bin(int(x) & 0xFFFFFFFF).count("1") for x in row[: (lib.vocab + 31) // 32].tolist())))
        if t is None:
            eos_ok = bool((int(row[lib.eos // 32]) >> (lib.eos % 32)) & 1)
            break
        if not (int(row[t // 32]) >> (t % 32)) & 1:
            return {
                "ok": False,
                "error": f"token {t} ({lib.hf.decode([t])!r}) masked out at step {len(fill_ns) - 1}"
                + (": " + lib.error(m) if lib.error(m) else ""),
            }
        t2 = time.perf_counter_ns()
        ok = lib.accept(m, t)
        accept_ns.append(time.perf_counter_ns() - t2)
        if not ok:
            return {"ok": False, "error": f"token {t} refused at step {len(fill_ns) - 1}: {lib.error(m)}"}
    return {
        "ok": True,
        "fill_ns": fill_ns,
        "accept_ns": accept_ns,
        "allowed": allowed,
        "complete": lib.complete(m),
        "eos_allowed_at_end": eos_ok,
    }


def worker_case(spec: dict) -> dict:
    """Compile one grammar `reps` times (fresh each time), then walk its document cold and warm."""
    lib = Lib(spec["lib"], Path(spec["tok_dir"]))
    kind, gspec, doc = grammar_cases()[spec["grammar"]]
    ids = lib.encode(doc)
    out: dict = {
        "tokenizer_setup_s": lib.tokenizer_setup_s,
        "vocab": lib.vocab,
        "doc_tokens": len(ids),
        "doc_chars": len(doc),
    }
    rss0 = _rss_kb()
    compile_s, matcher_s, first_mask_s, cold_walks, warm_walks = [], [], [], [], []
    bm = lib.bitmask(1)
    compiled = None
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        compiled = lib.compile(kind, gspec, fresh=True)
        compile_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = lib.matcher(compiled)
        matcher_s.append(time.perf_counter() - t0)
        w = _walk(lib, m, ids, bm)
        if not w["ok"]:
            out.update(ok=False, error=w["error"], compile_s=compile_s)
            return out
        first_mask_s.append(w["fill_ns"][0] / 1e9)
        cold_walks.append(w)
        # warm: a second matcher from the same compiled grammar (what a grammar cache serves)
        w2 = _walk(lib, lib.matcher(compiled), ids, bm)
        warm_walks.append(w2)
    out["rss_growth_kb"] = _rss_kb() - rss0
    if lib.name == "xgrammar":
        out["compiled_memory_bytes"] = compiled.memory_size_bytes
        # the compiler's cache: a second compile of the same grammar through one cached compiler
        lib.cache = True
        c = lib.new_compiler()
        lib.compiler = c
        t0 = time.perf_counter()
        lib.compile(kind, gspec, fresh=False)
        t1 = time.perf_counter()
        lib.compile(kind, gspec, fresh=False)
        out["cached_compiler_first_s"] = t1 - t0
        out["cache_hit_s"] = time.perf_counter() - t1
        # lazy ("dynamic") compilation: compile time, then the first walk pays for the masks
        lib.cache, lib.dynamic = False, True
        dyn_c, dyn_walk = [], []
        for _ in range(min(3, spec["reps"])):
            t0 = time.perf_counter()
            cg = lib.compile(kind, gspec, fresh=True)
            dyn_c.append(time.perf_counter() - t0)
            w = _walk(lib, lib.matcher(cg), ids, bm)
            if w["ok"]:
                dyn_walk.append(sum(w["fill_ns"]) / 1e9)
        out["dynamic_compile_s"] = dyn_c
        out["dynamic_first_walk_fill_s"] = dyn_walk
    out.update(
        ok=True,
        compile_s=compile_s,
        matcher_s=matcher_s,
        first_mask_s=first_mask_s,
        complete=cold_walks[0]["complete"],
        eos_allowed_at_end=cold_walks[0]["eos_allowed_at_end"],
        allowed_per_step=cold_walks[0]["allowed"],
        cold=_stats_us([x for w in cold_walks for x in w["fill_ns"][1:]]),
        warm=_stats_us([x for w in warm_walks for x in w["fill_ns"]]),
        accept=_stats_us([x for w in cold_walks for x in w["accept_ns"]]),
        walk_fill_total_s=[sum(w["fill_ns"]) / 1e9 for w in cold_walks],
        maxrss_kb=_maxrss_kb(),
    )
    return out


def _json_doc(x) -> str:
    return json.dumps(x)


def worker_coverage(spec: dict) -> dict:
    lib = Lib(spec["lib"], Path(spec["tok_dir"]), strict=spec.get("strict", True))
    res = {}
    for name, (schema, good, bad) in COVERAGE.items():
        r: dict = {}
        try:
            t0 = time.perf_counter()
            compiled = lib.compile("json_schema", schema)
            r["compile_s"] = time.perf_counter() - t0
        except Exception as e:  # refused
            r["status"] = "refused"
            r["error"] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            res[name] = r
            continue

        def feed(inst) -> tuple:
            m = lib.matcher(compiled)  # noqa: B023 (called before the loop moves on)
            for t in lib.encode(_json_doc(inst)):
                if not lib.accept(m, t):
                    return False, "token refused"
            return lib.complete(m), ("" if lib.complete(m) else "incomplete at end")

        ok_good, why_good = feed(good)
        r["valid_accepted"] = ok_good
        if bad is not None:
            ok_bad, _ = feed(bad)
            r["invalid_accepted"] = ok_bad
        if not ok_good:
            r["status"] = "rejects valid instance"
        elif bad is None:
            r["status"] = "accepted"
        elif r["invalid_accepted"]:
            r["status"] = "accepted, not enforced"
        else:
            r["status"] = "enforced"
        res[name] = r
    return {"ok": True, "coverage": res}


def worker_patho(spec: dict) -> dict:
    lib = Lib(spec["lib"], Path(spec["tok_dir"]), limits=False)
    kind, gspec, doc = patho_cases()[spec["case"]]
    if kind == "json_schema":  # both libraries take the schema as a string: no Python recursion in json.dumps
        sys.setrecursionlimit(100_000)
        gspec = json.dumps(gspec)
    out: dict = {}
    t0 = time.perf_counter()
    try:
        compiled = lib.compile(kind, gspec, fresh=True)
    except Exception as e:
        out.update(
            ok=False,
            stage="compile",
            compile_s=time.perf_counter() - t0,
            error=(str(e).strip() or type(e).__name__)[:300],
            maxrss_kb=_maxrss_kb(),
        )
        return out
    out["compile_s"] = time.perf_counter() - t0
    print(json.dumps({"progress": "compiled", "compile_s": out["compile_s"]}), flush=True)
    ids = lib.encode(doc)
    out["doc_tokens"] = len(ids)
    t0 = time.perf_counter()
    w = _walk(lib, lib.matcher(compiled), ids, lib.bitmask(1))
    out["walk_s"] = time.perf_counter() - t0
    if not w["ok"]:
        out.update(ok=False, stage="walk", error=w["error"][:300], maxrss_kb=_maxrss_kb())
        return out
    st = _stats_us(w["fill_ns"])
    out.update(
        ok=True,
        first_mask_us=w["fill_ns"][0] / 1000,
        mask_median_us=st["median_us"],
        mask_max_us=st["max_us"],
        complete=w["complete"],
        maxrss_kb=_maxrss_kb(),
    )
    return out


def worker_gil(spec: dict) -> dict:
    """Progress of a counting thread while the main thread compiles the large schema over and over for ~2 s,
    relative to the same thread counting alone (~100%: the compile runs without the GIL; ~0%: it holds it)."""
    import threading

    lib = Lib(spec["lib"], Path(spec["tok_dir"]))
    kind, gspec, _ = grammar_cases()[spec["grammar"]]
    lib.compile(kind, gspec)  # warm-up: imports, allocator

    def measure(work) -> tuple:
        stop, counts = threading.Event(), {}

        def counter():
            c, t = 0, time.perf_counter()
            while not stop.is_set():
                c += 1
            counts["rate"] = c / (time.perf_counter() - t)

        th = threading.Thread(target=counter)
        th.start()
        n = work()
        stop.set()
        th.join()
        return counts["rate"], n

    def idle() -> int:
        time.sleep(1.0)
        return 0

    def compiles() -> int:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            lib.compile(kind, gspec)
            n += 1
        return n

    def holds_gil() -> int:  # control: C code that keeps the GIL (list sort)
        import random

        xs = list(range(1_000_000))
        random.Random(0).shuffle(xs)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            sorted(xs)
            n += 1
        return n

    def releases_gil() -> int:  # control: C code that drops the GIL (sha256 of 16 MiB)
        import hashlib

        b, n, t0 = b"x" * (16 << 20), 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            hashlib.sha256(b).digest()
            n += 1
        return n

    alone, _ = measure(idle)
    t0 = time.perf_counter()
    during, n = measure(compiles)
    compile_s = (time.perf_counter() - t0) / n
    held, _ = measure(holds_gil)
    released, _ = measure(releases_gil)
    return {
        "ok": True,
        "compile_s": compile_s,
        "compiles": n,
        "counter_rate_vs_alone": during / alone,
        "control_sort_holds_gil": held / alone,
        "control_sha256_releases_gil": released / alone,
    }


def worker_apply(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import llguidance.torch as lt
    import xgrammar as xgr

    torch.manual_seed(0)
    out = {}
    for batch in (1, 16):
        V = 32000
        logits = torch.randn(batch, V, dtype=torch.float32)
        bm = torch.randint(-(2**31), 2**31 - 1, (batch, (V + 31) // 32), dtype=torch.int32)
        ref = logits.clone()
        bits = ((bm.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).reshape(batch, -1)[:, :V]
        ref[bits == 0] = float("-inf")
        r = {}
        shifts = torch.arange(32, dtype=torch.int32)

        def eager(x):  # plain eager torch, no torch.compile, no C++ extension
            b = ((bm.unsqueeze(-1) >> shifts) & 1).reshape(bm.shape[0], -1)[:, : x.shape[1]]  # noqa: B023 (called before the loop moves on)
            x.masked_fill_(b == 0, float("-inf"))

        for name, fn in (
            ("llguidance.torch.apply_token_bitmask_inplace", lambda x: lt.apply_token_bitmask_inplace(x, bm)),  # noqa: B023 (called before the loop moves on)
            ("xgrammar.apply_token_bitmask_inplace", lambda x: xgr.apply_token_bitmask_inplace(x, bm)),  # noqa: B023 (called before the loop moves on)
            ("eager torch: (mask >> arange(32)) & 1, masked_fill_", eager),
        ):
            x = logits.clone()
            t0 = time.perf_counter()
            fn(x)
            first = time.perf_counter() - t0
            correct = bool(torch.equal(x, ref))
            times = []
            for _ in range(300):
                x = logits.clone()
                t0 = time.perf_counter_ns()
                fn(x)
                times.append(time.perf_counter_ns() - t0)
            st = _stats_us(times)
            r[name] = {
                "first_call_s": first,
                "min_us": min(times) / 1000,
                "median_us": st["median_us"],
                "p99_us": st["p99_us"],
                "correct": correct,
            }
        # reference: the clone alone (what the loop above pays besides the call)
        times = []
        for _ in range(300):
            t0 = time.perf_counter_ns()
            x = logits.clone()
            times.append(time.perf_counter_ns() - t0)
        r["logits.clone() (not in the timings)"] = {"median_us": statistics.median(times) / 1000}
        out[f"[{batch}, {V}]"] = r
    return {"ok": True, "apply": out}


COVERAGE_RUNS = (
    ("llguidance", "llguidance", True),
    ("xgrammar", "xgrammar", True),
    ("xgrammar strict_mode=False", "xgrammar", False),
)

WORKERS = {
    "case": worker_case,
    "coverage": worker_coverage,
    "patho": worker_patho,
    "gil": worker_gil,
    "apply": worker_apply,
}


# --------------------------------------------------------------------------------------------------------------
# Driver


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        RAYON_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp / "hf"),
        XDG_CACHE_HOME=str(tmp / "cache"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
        TRITON_CACHE_DIR=str(tmp / "triton"),
        PYTHONWARNINGS="ignore",
    )
    return env


def run_worker(spec: dict, timeout: float, env: dict) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        progress = (
            [ln for ln in (e.stdout or b"").decode(errors="replace").splitlines() if '"progress"' in ln]
            if isinstance(e.stdout, bytes)
            else [ln for ln in (e.stdout or "").splitlines() if '"progress"' in ln]
        )
        return {
            "ok": False,
            "timeout": True,
            "wall_s": time.perf_counter() - t0,
            "error": f"no result after {timeout:.0f} s (killed)",
            "progress": json.loads(progress[-1]) if progress else None,
        }
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{") and '"progress"' not in ln]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return {
            "ok": False,
            "crashed": True,
            "returncode": p.returncode,
            "wall_s": wall,
            "error": f"worker exited {p.returncode}: " + " | ".join(tail)[-400:],
        }
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    return res


def machine_info() -> dict:
    import importlib.metadata as md

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("llguidance", "xgrammar", "torch", "transformers", "tokenizers", "numpy", "apache-tvm-ffi"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        import llguidance

        info["llguidance.get_version()"] = llguidance.get_version()
    except Exception:
        pass
    cpu = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                if k in ("model name", "flags") and k not in cpu:
                    cpu[k] = v
    info["cpu_model"] = cpu.get("model name")
    info["cpu_flags"] = cpu.get("flags", "")
    info["cpus"] = os.cpu_count()
    info["loadavg_start"] = os.getloadavg()
    return info


def drive(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="grammar-bench-"))
    env = _env(tmp)
    res: dict = {
        "info": machine_info(),
        "cases": {},
        "coverage": {},
        "patho": {},
        "gil": {},
        "apply": None,
        "settings": {"reps": args.reps, "patho_timeout_s": PATHO_TIMEOUT_S, "threads": 1},
    }
    grammars = list(grammar_cases())
    if args.only:
        grammars = [g for g in grammars if g in args.only]
    for tok_name, tok_dir in TOKENIZERS.items():
        for g in grammars:
            for lib in LIBS:
                reps = max(2, args.reps // 2) if g == "large_schema" else args.reps
                spec = {"kind": "case", "lib": lib, "tok_dir": str(tok_dir), "grammar": g, "reps": reps}
                r = run_worker(spec, CASE_TIMEOUT_S, env)
                res["cases"].setdefault(tok_name, {}).setdefault(g, {})[lib] = r
                _log(
                    f"case {tok_name} {g} {lib}: "
                    + (
                        f"compile min {min(r['compile_s']) * 1e3:.2f} ms, mask median {r['cold']['median_us']:.1f} us"
                        if r.get("ok")
                        else r.get("error", "?")
                    )
                )
    if not args.only:
        for key, lib, strict in COVERAGE_RUNS:
            r = run_worker(
                {"kind": "coverage", "lib": lib, "tok_dir": str(TOKENIZERS["demo-4096"]), "strict": strict}, 300, env
            )
            res["coverage"][key] = r
            _log(f"coverage {lib}: {'ok' if r.get('ok') else r.get('error')}")
        for case in patho_cases():
            for lib in LIBS:
                r = run_worker(
                    {"kind": "patho", "lib": lib, "tok_dir": str(TOKENIZERS["tinyllama-32000"]), "case": case},
                    PATHO_TIMEOUT_S,
                    env,
                )
                res["patho"].setdefault(case, {})[lib] = r
                _log(
                    f"patho {case} {lib}: {json.dumps({k: v for k, v in r.items() if k in ('ok', 'compile_s', 'walk_s', 'error')})[:300]}"  # noqa: E501
                )
        for lib in LIBS:
            r = run_worker(
                {"kind": "gil", "lib": lib, "tok_dir": str(TOKENIZERS["tinyllama-32000"]), "grammar": "large_schema"},
                300,
                env,
            )
            res["gil"][lib] = r
            _log(f"gil {lib}: {r}")
        r = run_worker({"kind": "apply"}, 600, env)
        res["apply"] = r
        _log(f"apply: {'ok' if r.get('ok') else r.get('error')}")
    res["info"]["loadavg_end"] = os.getloadavg()
    return res


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Report


def _ms(x) -> str:
    return f"{x * 1e3:.2f}" if x is not None else ""


def _min_med(xs) -> str:
    return f"{min(xs) * 1e3:.2f} / {statistics.median(xs) * 1e3:.2f}" if xs else ""


def render(res: dict) -> str:
    info = res["info"]
    L = []
    a = L.append
    a("# Grammar libraries for structured output: llguidance vs xgrammar")
    a("")
    a(
        f"llguidance {info['llguidance']}, xgrammar {info['xgrammar']} (apache-tvm-ffi {info.get('apache-tvm-ffi')}); "
        f"torch {info['torch']}, transformers {info['transformers']}, tokenizers {info['tokenizers']}, "
        f"Python {info['python']}. Measured by `bench/grammar_libraries.py` in its own venv (issue 21, item 1)."
    )
    a("")
    a(
        f"CPU: {info['cpu_model']}, {info['cpus']} cores shared with other work (load average "
        f"{info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end): absolute times are "
        "noisy, the ratios between the libraries are what to read. One thread everywhere "
        "(torch.set_num_threads(1), OMP/MKL/RAYON_NUM_THREADS=1, xgrammar `max_threads=1`); each measurement in "
        "its own subprocess.  "
    )
    wanted = {
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512cd",
        "avx512_bf16",
        "avx512_vnni",
        "avx512vbmi",
        "avx_vnni",
        "sse4_2",
        "popcnt",
    }
    flags = [f for f in info["cpu_flags"].split() if f in wanted]
    a(f"CPU flags (vector ISA subset): {' '.join(sorted(flags))}")
    a("")
    a(
        "Vocabularies: **demo-4096** = models/demo/tokenizer.json (byte-level BPE, 4096 tokens); **tinyllama-32000** "
        "= checkpoints/tinyllama-1.1b-random/tokenizer.json (byte-level BPE, 32000 tokens, trained locally by "
        "bench/make_random_checkpoint.py: Llama's vocabulary size, not Llama's sentencepiece merges)."
    )
    a("")
    a(
        'What "compile" is: llguidance — `LLMatcher(tokenizer, grammar_from_*(...))`, which parses the grammar, '
        "builds the CFG and the lexer's regex set; lexer DFA states and token-trie walks are computed lazily, "
        "during mask computation, so part of the cost moves to the first masks. There is no cache in the "
        "library: the start-state matcher is what an engine caches and `deep_copy()`s per request (the warm "
        "rows). xgrammar — `GrammarCompiler.compile_*()` with `cache_enabled=False` and a fresh compiler each "
        "time; it precomputes the token masks of every grammar position (adaptive token mask cache) eagerly "
        "unless `enable_dynamic_compilation=True`; its compiler has an LRU cache keyed by the grammar "
        "(the tokenizer is fixed per compiler); a `GrammarMatcher` per request."
    )
    a("")
    # tokenizer set-up
    a("## Tokenizer set-up (once per tokenizer)")
    a("")
    a(
        "| vocabulary | llguidance `hf.from_tokenizer` ms (min / median)"
        " | xgrammar `TokenizerInfo.from_huggingface` ms (min / median) |"
    )
    a("|---|---:|---:|")
    for tok, gs in res["cases"].items():
        cells = []
        for lib in LIBS:
            xs = [g[lib]["tokenizer_setup_s"] for g in gs.values() if lib in g and "tokenizer_setup_s" in g[lib]]
            cells.append(_min_med(xs))
        a(f"| {tok} | {cells[0]} | {cells[1]} |")
    a("")
    # compile table
    a("## Compile time (ms, min / median over fresh compiles)")
    a("")
    a(
        "`first mask` = the first `fill_next_token_bitmask` of a freshly compiled grammar's first matcher (lazy work "
        "lands there). xgrammar extras: `dyn compile` = `enable_dynamic_compilation=True`; `cache hit` = the "
        "same grammar compiled again through one cached compiler."
    )
    a("")
    a(
        "| vocabulary | grammar | doc tokens | llguidance compile | llguidance first mask | xgrammar compile"
        " | xgrammar first mask | xgrammar dyn compile | xgrammar cache hit |"
    )
    a("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for tok, gs in res["cases"].items():
        for g, libs in gs.items():
            l_, x_ = libs.get("llguidance", {}), libs.get("xgrammar", {})

            def cc(r):
                if not r.get("ok"):
                    return "FAILED: " + r.get("error", "")[:80], ""
                return _min_med(r["compile_s"]), _min_med(r["first_mask_s"])

            lc, lf = cc(l_)
            xc, xf = cc(x_)
            dyn = _min_med(x_.get("dynamic_compile_s", [])) if x_.get("ok") else ""
            hit = f"{x_['cache_hit_s'] * 1e3:.3f}" if x_.get("ok") else ""
            ntok = l_.get("doc_tokens", x_.get("doc_tokens", ""))
            a(f"| {tok} | {g} | {ntok} | {lc} | {lf} | {xc} | {xf} | {dyn} | {hit} |")
    a("")
    # mask table
    a("## Per-token mask time (µs per step: median / p99)")
    a("")
    a(
        "Walking the tokenized document: before each token the next-token bitmask is filled (timed), the token is "
        "checked to be allowed, then accepted. `cold` = the first matcher of a freshly compiled grammar (all reps, "
        "first step excluded: it is the table above); `warm` = a second matcher from the same compiled grammar "
        "(the grammar-cache case). `accept` = consume_token / accept_token. `allowed` = tokens the mask allows, "
        "median over steps (both libraries should agree, up to whitespace/escape policy)."
    )
    a("")
    a(
        "| vocabulary | grammar | steps | llguidance cold | llguidance warm | llguidance accept"
        " | xgrammar cold | xgrammar warm | xgrammar accept | allowed llg / xgr |"
    )
    a("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tok, gs in res["cases"].items():
        for g, libs in gs.items():
            l_, x_ = libs.get("llguidance", {}), libs.get("xgrammar", {})

            def mm(r, k):
                return f"{r[k]['median_us']:.1f} / {r[k]['p99_us']:.1f}" if r.get("ok") else "—"

            steps = (l_.get("doc_tokens") or 0) + 1
            al = lambda r: str(int(statistics.median(r["allowed_per_step"]))) if r.get("ok") else "—"  # noqa: E731
            a(
                f"| {tok} | {g} | {steps} | {mm(l_, 'cold')} | {mm(l_, 'warm')} | {mm(l_, 'accept')} | "
                f"{mm(x_, 'cold')} | {mm(x_, 'warm')} | {mm(x_, 'accept')} | {al(l_)} / {al(x_)} |"
            )
    a("")
    # memory
    a("## Memory")
    a("")
    a(
        "RSS growth of the worker over its compiles and walks (KiB; includes allocator noise), and xgrammar's "
        "`CompiledGrammar.memory_size_bytes` (llguidance has no such API)."
    )
    a("")
    a("| vocabulary | grammar | llguidance RSS growth KiB | xgrammar RSS growth KiB | xgrammar compiled grammar KiB |")
    a("|---|---|---:|---:|---:|")
    for tok, gs in res["cases"].items():
        for g, libs in gs.items():
            l_, x_ = libs.get("llguidance", {}), libs.get("xgrammar", {})
            a(
                f"| {tok} | {g} | {l_.get('rss_growth_kb', '—')} | {x_.get('rss_growth_kb', '—')} | "
                f"{x_['compiled_memory_bytes'] / 1024:.0f} |"
                if x_.get("ok")
                else f"| {tok} | {g} | | | |"
            )
    a("")
    # GIL
    if res.get("gil"):
        a("## Does compilation hold the GIL?")
        a("")
        a(
            "The large schema (tinyllama-32000) compiled in a loop for ~2 s on the main thread while a second Python "
            "thread counts; the counter's rate relative to the same thread counting while the main thread sleeps "
            "(≈100%: the compile runs without the GIL, given a free core; ≈0%: it holds the GIL; the 2 cores are "
            "shared with other work, so read it coarsely)."
        )
        a("")
        a(
            "| library | compile ms (mean of the loop) | counter rate during compile"
            " | control: sorted() (holds the GIL) | control: sha256 (drops the GIL) |"
        )
        a("|---|---:|---:|---:|---:|")
        for lib, r in res["gil"].items():
            if r.get("ok"):
                a(
                    f"| {lib} | {r['compile_s'] * 1e3:.1f} | {r['counter_rate_vs_alone'] * 100:.0f}% | "
                    f"{r['control_sort_holds_gil'] * 100:.0f}% | {r['control_sha256_releases_gil'] * 100:.0f}% |"
                )
            else:
                a(f"| {lib} | FAILED | {r.get('error', '')[:100]} |")
        a("")
    # coverage
    if res.get("coverage"):
        a("## JSON-schema keyword coverage (default options)")
        a("")
        a(
            "Each schema compiled with defaults (llguidance: `grammar_from_json_schema`, not lenient; xgrammar: "
            "`compile_json_schema`, strict_mode=True, any_whitespace=True), then a valid and an invalid instance fed "
            "token by token. `enforced` = valid accepted, invalid rejected; `accepted, not enforced` = the keyword is "
            "silently ignored (the invalid instance passes); `rejects valid instance` = over-constrains (or, for "
            "additionalProperties absent, strict mode forbids the extra key)."
        )
        a("")
        keys = [k for k, _, _ in COVERAGE_RUNS if k in res["coverage"]]
        a("| keyword | " + " | ".join(keys) + " |")
        a("|---|" + "---|" * len(keys))
        cov = {k: res["coverage"].get(k, {}).get("coverage", {}) for k in keys}
        for kw in COVERAGE:
            cells = []
            for lib in keys:
                r = cov[lib].get(kw)
                if r is None:
                    cells.append("—")
                elif r["status"] == "refused":
                    cells.append("refused: " + r["error"].replace("|", "\\|")[:110])
                else:
                    cells.append(r["status"])
            a(f"| {kw} | " + " | ".join(cells) + " |")
        a("")
    # patho
    if res.get("patho"):
        a(f"## Pathological inputs (tinyllama-32000; each in a subprocess killed after {PATHO_TIMEOUT_S:.0f} s)")
        a("")
        a(
            "compile = time to a compiled grammar or to the error; walk = compile's matcher fed a matching input "
            "(tokens), every mask filled; `killed` = no answer in the time limit (a hang for a server). Peak RSS is the "  # noqa: E501
            "whole worker process (Python, torch, transformers, the tokenizer), not the grammar alone."
        )
        a("")
        a("| case | llguidance | xgrammar |")
        a("|---|---|---|")
        for case, libs in res["patho"].items():
            cells = []
            for lib in LIBS:
                r = libs.get(lib, {})
                if r.get("timeout"):
                    pr = r.get("progress")
                    extra = (
                        f" (compiled in {pr['compile_s']:.2f} s, then hung in the walk)" if pr else " during compile"
                    )
                    cells.append(f"**killed at {PATHO_TIMEOUT_S:.0f} s**{extra}")
                elif r.get("crashed"):
                    cells.append(f"**crashed** ({r.get('error', '')[:120]})".replace("|", "\\|"))
                elif not r.get("ok"):
                    st = r.get("stage")
                    t = f"{r['compile_s'] * 1e3:.1f} ms" if "compile_s" in r else ""
                    cells.append(
                        f"error at {st} after {t}: {r.get('error', '')[:140]}".replace("|", "\\|").replace("\n", " ")
                    )
                else:
                    cells.append(
                        f"compile {r['compile_s'] * 1e3:.1f} ms; walk {r['doc_tokens']} tok in "
                        f"{r['walk_s'] * 1e3:.1f} ms (mask median {r['mask_median_us']:.0f} µs, max "
                        f"{r['mask_max_us'] / 1e3:.1f} ms); peak RSS {r['maxrss_kb'] / 1024:.0f} MiB"
                    )
            name = case.replace("|", "\\|")
            a(f"| `{name}` | {cells[0]} | {cells[1]} |")
        a("")
    # apply
    ap = res.get("apply")
    if ap and ap.get("ok"):
        a("## Applying the bitmask to CPU logits (fp32, random mask, 1 thread)")
        a("")
        a(
            "llguidance's function is `torch.compile(dynamic=True)`d: its first call compiles with Inductor (needs a C++ "  # noqa: E501
            "compiler at run time; a fresh Inductor cache here), and a new batch size recompiles once. xgrammar's CPU "
            "backend is its own C++ kernel. `correct` = identical to a reference masked_fill."
        )
        a("")
        a("| logits | function | first call ms | min µs | median µs | p99 µs | correct |")
        a("|---|---|---:|---:|---:|---:|---|")
        for shape, fns in ap["apply"].items():
            for fn, r in fns.items():
                if "first_call_s" in r:
                    a(
                        f"| {shape} | `{fn}` | {r['first_call_s'] * 1e3:.1f} | {r['min_us']:.1f} | {r['median_us']:.1f} | "  # noqa: E501
                        f"{r['p99_us']:.1f} | {'yes' if r['correct'] else 'NO'} |"
                    )
                else:
                    a(f"| {shape} | {fn} | | | {r['median_us']:.1f} | | |")
        a("")
    a("## Conclusion")
    a("")
    a(res.get("conclusion", "(see the report)"))
    a("")
    a("Command:")
    a("")
    a("    /work/scratch/grammar-venv/bin/python bench/grammar_libraries.py   # venv: see the module docstring")
    a("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="fresh compiles (and walks) per case (large schema: half)")
    ap.add_argument("--only", nargs="*", help="only these grammar cases; skips coverage/patho/gil/apply")
    ap.add_argument("--render", action="store_true", help="re-render the .md from the .json")
    ap.add_argument("--out", default=str(RESULTS / "grammar-libraries"), help="output path without extension")
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        try:
            r = WORKERS[spec["kind"]](spec)
        except Exception as e:  # a Python-level failure is a result too
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        print(json.dumps(r), flush=True)
        return
    out = Path(args.out)
    if args.render:
        res = json.loads(out.with_suffix(".json").read_text())
    else:
        res = drive(args)
        if out.with_suffix(".json").exists():  # keep a conclusion written earlier
            try:
                old = json.loads(out.with_suffix(".json").read_text())
                if "conclusion" in old:
                    res["conclusion"] = old["conclusion"]
            except Exception:
                pass
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render(res))
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
