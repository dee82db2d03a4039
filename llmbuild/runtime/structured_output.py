"""Structured output: a request's grammar (JSON schema, regex, choice, Lark) as a per-step token mask.

llguidance (bench/results/grammar-libraries.md says why it and not xgrammar) compiles a grammar lazily
against the engine's tokenizer and, at each step, fills a bitmask of the tokens that keep the output
inside the grammar. Its work is bounded by parser limits (lexer fuel, Earley items, grammar size), so a
pathological grammar ends in an error, not a hang; `compile` also gives up after a wall-clock limit.

Per step the engine fills the masks of the step's constrained sequences (StepMasks: during the forward
pass on a cuda engine), applies them to the logits rows before sampling, and feeds each sampled token
back to its matcher. Logprobs stay those of the unconstrained model.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from llmbuild.errors import RequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

GrammarKind = Literal["json", "regex", "choice", "grammar"]

COMPILE_SECONDS = 10.0
"""A grammar that takes longer than this to compile is refused (the work itself is bounded by LIMITS)."""
LIMITS = llguidance.LLParserLimits(max_grammar_size=200_000, step_max_items=50_000, verbose_errors=False)
_CACHE_SIZE = 256
JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as json.dumps writes it (`{"a": 1, "b": [2, 3]}`). With free whitespace between tokens a model
can pad forever (the endless-newlines reports against other servers); a schema may still ask for
another layout through llguidance's "x-guidance" key (whitespace_flexible, whitespace_pattern)."""


@dataclass(frozen=True, slots=True)
class Grammar:
    """What a request constrains its output to: `json` (a JSON schema as JSON text; "{}"-like schemas
    allow any JSON), `regex`, `choice` (a JSON list of strings) or `grammar` (Lark, llguidance's dialect)."""

    kind: GrammarKind
    text: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """A schema object, or one as JSON text (checked when compiled)."""
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, options: list[str]) -> Grammar:
        """Exactly one of `options`."""
        return cls("choice", json.dumps(options))

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's serialized form."""
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.text, defaults=JSON_LAYOUT)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.text)
        return llguidance.LLMatcher.grammar_from_lark(self.text)


WARM_UP_GRAMMAR = Grammar.json_schema({"type": "object"})
"""What `response_format: json_object` compiles to (serve/structured.py): warmed at server start."""


class GrammarCompiler:
    """Compiles grammars against one tokenizer, with a cache of compiled matchers (copied per request).

    Safe to call from several threads (the server compiles off its event loop).
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[Grammar, llguidance.LLMatcher] = OrderedDict()
        # several workers: a grammar at its time limit must not hold up the next request's
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grammar-compile")

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar`; RequestError (one line) for a grammar that is invalid, too large
        or slower to compile than COMPILE_SECONDS."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                return cached.deep_copy()
        future: Future = self._pool.submit(self._compile, grammar)
        try:
            compiled = future.result(timeout=COMPILE_SECONDS)
        except FutureTimeout:
            raise RequestError(
                f"{grammar.kind}: the grammar did not compile within {COMPILE_SECONDS:.0f} s; simplify it"
            ) from None
        with self._lock:
            self._cache[grammar] = compiled
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled.deep_copy()

    def warm_up(self) -> None:
        """Build llguidance's view of the tokenizer (~1 s for a 32k vocabulary) and compile a JSON-object
        grammar, so that the first constrained request does not wait for either (the server calls this on a
        thread at start)."""
        self.matcher(WARM_UP_GRAMMAR)

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        tokenizer = self._llg_tokenizer()
        try:
            text = grammar.llguidance_grammar()
        except ValueError as exc:
            raise RequestError(f"{grammar.kind}: {exc}") from None
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=LIMITS)
        matcher.compute_bitmask()  # the first mask builds what llguidance defers, and may hit a limit
        if matcher.is_error():
            raise RequestError(f"{grammar.kind}: {_first_line(matcher.get_error())}")
        return matcher

    def _llg_tokenizer(self) -> Any:
        # ~1 s for a 32k vocabulary: built on the first constrained request, not at load
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer


class StepMasks:
    """The token masks of one step's constrained rows.

    With `overlap` (cuda engines: the forward pass leaves the CPU free) a worker thread fills them while
    the pass runs; on a CPU engine the pass keeps every core busy and a thread only adds a hand-off, so
    they are filled in place (microseconds per row: bench/results/grammar-libraries.md).
    """

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")

    def __init__(
        self,
        matchers: list[tuple[int, Any, tuple[int, ...]]],
        vocab_size: int,
        eos: frozenset[int],
        overlap: bool,
    ) -> None:
        """`matchers`: (first logits row, matcher, proposed tokens) of each constrained sequence that samples
        this step; its rows are the first and one per proposed token (speculative decoding)."""
        self.rows = [row + j for row, _, drafts in matchers for j in range(len(drafts) + 1)]
        self._eos = sorted(t for t in eos if t < vocab_size)
        self._bitmask = llguidance.torch.allocate_token_bitmask(len(self.rows), vocab_size)
        fill = [(m, drafts) for _, m, drafts in matchers]
        self._future: Future | None = self._pool.submit(self._fill, fill) if overlap else None
        if not overlap:
            self._fill(fill)

    def _fill(self, matchers: list[tuple[Any, tuple[int, ...]]]) -> None:
        i = 0
        for matcher, drafts in matchers:
            # row j's mask is the grammar's state after the first j proposed tokens (taken back afterwards);
            # rows past a proposal the grammar refuses keep the full mask: verification stops before them
            valid = matcher.validate_tokens(list(drafts)) if drafts else 0
            for j in range(valid + 1):
                self._fill_row(matcher, i + j)
                if j < valid:
                    matcher.consume_token(drafts[j])
            if valid:
                matcher.rollback(valid)
            i += len(drafts) + 1

    def _fill_row(self, matcher: Any, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(matcher, self._bitmask, row)
        if matcher.is_error():
            # a parser limit hit mid-output (llguidance fails at a step, not only at compile): let the
            # row end with EOS; LLMEngine finishes the request when the matcher refuses a token
            self._bitmask[row] = 0
            for t in self._eos:
                self._bitmask[row, t // 32] |= 1 << (t % 32)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token outside its row's grammar at -inf (a copy: the caller's stay raw)."""
        if self._future is not None:
            self._future.result()
        vocab = logits.shape[1]
        if logits.device.type == "cpu":
            # NOTE: numpy, not torch: these small elementwise ops are ~0.1 ms on one thread, but torch hands
            # them to its OpenMP pool, which on a busy 2-core host took ~200 ms per step (measured)
            packed = self._bitmask.numpy().view(np.uint8)
            allowed = np.unpackbits(packed, axis=1, bitorder="little")[:, :vocab].astype(bool)
            out = logits.numpy().copy()
            out[self.rows] = np.where(allowed, out[self.rows], -np.inf)
            return torch.from_numpy(out)
        bits = (self._bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed_t = bits.flatten(1)[:, :vocab].bool().to(logits.device)
        out_t = logits.clone()
        rows = torch.tensor(self.rows, device=logits.device)
        out_t[rows] = out_t[rows].masked_fill(~allowed_t, float("-inf"))
        return out_t


def _first_line(message: str) -> str:
    """llguidance's (multi-line) error as one line, at most 300 characters."""
    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip()) or "invalid grammar"
    return line if len(line) <= 300 else line[:297] + "..."
