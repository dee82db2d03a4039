"""LLMEngine: the in-process generation loop over one engine rank.

batch  = scheduler.schedule()               # which tokens of which requests (+ proposed ones)
logits = runner.execute(batch)              # one packed step of the compiled graph
tokens = sampler.verify(logits, batch...)   # a token per sampling sequence, after its kept proposals
scheduler.update(batch, tokens)             # append, stop, free blocks
detokenize + stop strings                   # text deltas for the caller, one output per token
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbuild.errors import EngineError, RequestError
from llmbuild.manifest import DRAFT_DIR, MANIFEST, Manifest, verify_files
from llmbuild.memory_plan import MemoryPlan, available_memory_bytes, format_bytes, plan_memory
from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.block_pool import BlockPool
from llmbuild.runtime.detokenizer import IncrementalDetokenizer
from llmbuild.runtime.draft_proposer import DraftProposer
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.kv_cache import allocate_kv_cache
from llmbuild.runtime.logprobs import TokenLogprobs, token_logprobs
from llmbuild.runtime.lora_manager import LoraManager
from llmbuild.runtime.model_runner import ModelRunner
from llmbuild.runtime.rank_workers import RankWorkers
from llmbuild.runtime.request import FinishReason, Request
from llmbuild.runtime.sampler import Sampler
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, StepBatch
from llmbuild.runtime.speculative import Speculator, speculation_override
from llmbuild.runtime.structured_output import GrammarCompiler, StepMasks
from llmbuild.tensor_parallel import rank_config


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One new token of one request (a step gives a request several when it keeps proposed tokens)."""

    request_id: str
    token_id: int
    text: str
    """New text that is safe to show (complete characters, no possible stop-string prefix)."""
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With params.prompt_logprobs, on the request's first output: one entry per prompt token."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The final result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


class LLMEngine:
    """Requests in, tokens and text out; one `step()` runs one batched forward pass.

    A tensor-parallel engine runs its other ranks in worker processes (`workers`); close() stops them.
    """

    def __init__(
        self,
        engine: Engine,
        enable_prefix_caching: bool = True,
        workers: RankWorkers | None = None,
        cuda_graphs: bool | None = None,
        speculative: bool | SpeculativeSection = True,
        draft: Engine | None = None,
    ) -> None:
        """`cuda_graphs` overrides the engine's `cuda_graphs.enabled` (cuda engines; cpu ones have none).
        `speculative`: True = the manifest's speculative decoding (if any), False = none, or a section to
        use instead. `draft`: an engine with the same tokenizer that proposes the tokens (method draft; with
        speculative=True the manifest's other settings, or the defaults); it runs in this process (rank 0)."""
        manifest = engine.manifest
        if manifest.target.tensor_parallel > 1 and workers is None:
            raise EngineError(f"{engine.path}: a tensor-parallel engine runs all its ranks; use LLMEngine.from_dir")
        self.engine = engine
        self.workers = workers
        self.limits = manifest.limits
        self.tokenizer = engine.load_tokenizer()
        self.memory = self._plan_memory(engine)
        eos = frozenset(manifest.model.eos_token_ids)
        block_size = manifest.kv_cache.block_size
        self.pool = BlockPool(self.memory.num_blocks, enable_prefix_caching)
        rank_model = rank_config(manifest.model, manifest.target.tensor_parallel)
        graphs = manifest.cuda_graphs.enabled if cuda_graphs is None else cuda_graphs
        graphs = graphs and engine.device.type == "cuda" and workers is None
        # with CUDA graphs, one block beyond the pool's takes the padding rows' K/V (runtime/cuda_graphs.py)
        num_blocks = self.memory.num_blocks + (1 if graphs else 0)
        caches = allocate_kv_cache(rank_model, num_blocks, block_size, engine.kv_cache_dtype, engine.device)
        if workers is not None:
            workers.allocate(self.memory.num_blocks)
        self.runner = ModelRunner(engine.graph, caches, block_size, self.limits.max_seq_len, workers)
        if graphs:
            buckets = tuple(b for b in manifest.cuda_graphs.batch_sizes if b <= self.limits.max_batch_size)
            self.runner.capture_decode_graphs(buckets or (self.limits.max_batch_size,), self.memory.num_blocks)
        if speculative is True and draft is not None:
            speculative = speculation_override(manifest.speculative, None, None, draft=True)
        section = manifest.speculative if speculative is True else speculative or None
        self.speculator = self._speculator(section, draft) if section is not None else None
        self.loras = LoraManager(engine, workers) if manifest.lora is not None else None
        """The adapters this engine serves (None: built without LoRA slots)."""
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=self.limits.max_batch_size,
                max_num_tokens=self.limits.max_num_tokens,
                max_seq_len=self.limits.max_seq_len,
                block_size=block_size,
                eos_token_ids=eos,
                max_loras=manifest.lora.max_loras if manifest.lora is not None else 0,
            ),
            self.pool,
            self.speculator,
        )
        self.sampler = Sampler(manifest.model.vocab_size, eos)
        self.grammars = GrammarCompiler(self.tokenizer, manifest.model.vocab_size)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.model_seconds = 0.0
        """Time spent in the forward pass and sampling, summed over steps (the rest is overhead)."""

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        verify: bool = True,
        backend: str | None = None,
        enable_prefix_caching: bool = True,
        cuda_graphs: bool | None = None,
        speculative: bool | SpeculativeSection = True,
        draft_engine: str | Path | None = None,
    ) -> LLMEngine:
        """Load an engine directory (starting worker processes for the other ranks of a tensor-parallel one),
        and `draft_engine`, the directory of a draft engine that proposes tokens (see __init__'s `draft`).
        Without one, an engine built with its draft (speculative.draft) speculates with that draft."""
        manifest = Manifest.load(Path(path))
        if draft_engine is None:
            draft_engine = built_in_draft(Path(path), manifest, speculative, verify)
        draft = Engine.load(draft_engine, verify=verify, backend=backend) if draft_engine is not None else None
        tp = manifest.target.tensor_parallel
        if tp == 1:
            engine = Engine.load(path, verify=verify, backend=backend)
            return cls(engine, enable_prefix_caching, cuda_graphs=cuda_graphs, speculative=speculative, draft=draft)
        workers, engine = RankWorkers.launch(Path(path), tp, verify=verify, backend=backend)
        try:
            return cls(engine, enable_prefix_caching, workers, speculative=speculative, draft=draft)
        except BaseException:
            workers.stop()
            raise

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (idempotent; nothing to do otherwise)."""
        if self.workers is not None:
            self.workers.stop()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_alive(self) -> None:
        """Call while idle: raises EngineError if a worker process died; keeps waiting workers in touch."""
        if self.workers is not None:
            self.workers.keep_alive()

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        lora: str | None = None,
    ) -> Request:
        """Tokenize and validate a prompt against the engine's limits (nothing is queued); `lora` names a
        registered adapter to run it with (None: the base weights).

        Safe to call from any thread: it reads only immutable engine state (and the adapter registry).
        """
        adapter = None
        if lora is not None:
            if self.loras is None:
                raise RequestError(
                    f"this engine has no LoRA slots, so it cannot run adapter {lora!r}; "
                    "rebuild it with a recipe `lora` section"
                )
            adapter = self.loras.resolve(lora)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab, max_len = self.engine.manifest.model.vocab_size, self.limits.max_seq_len
        if not ids:
            raise RequestError("prompt is empty")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is out of range [0, {vocab})")
        bias = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bias is not None:
            raise RequestError(f"logit_bias token id {bias} is out of range [0, {vocab})")
        if len(ids) >= max_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens but the engine's max_seq_len is {max_len} (prompt and output "
                f"together); shorten the prompt or rebuild with a larger limits.max_seq_len"
            )
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=ids,
            params=params,
            max_tokens=min(params.max_tokens, max_len - len(ids)),
            generator=generator,
            priority=priority,
            matcher=matcher,
            lora=adapter,
        )
        self.scheduler.check_fits(request)
        return request

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer.backend_tokenizer,
            request.prompt_token_ids,
            stop=request.params.stop,
            skip_special_tokens=request.params.skip_special_tokens,
        )

    def abort(self, request: Request) -> None:
        self.scheduler.finish(request, FinishReason.ABORT)
        self._detokenizers.pop(request.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one step; return the new tokens and text of every request that got any (one output per token)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.has_unfinished():
                # add() admits only requests that fit the cache alone, so this is a scheduler bug
                raise RuntimeError("scheduler made no progress with unfinished requests")
            return []
        start = time.perf_counter()
        if self.loras is not None:
            self.loras.assign(s.request for s in batch.seqs)
        seqs = batch.sampling_seqs
        sampling = [s.request for s in seqs]
        first_rows = list(itertools.accumulate((s.num_rows for s in seqs), initial=0))
        constrained = [
            (row, s.request.matcher, s.draft_token_ids)
            for row, s in zip(first_rows, seqs, strict=False)
            if s.request.matcher is not None
        ]
        masks = None
        if constrained:
            cuda = self.engine.device.type == "cuda"
            masks = StepMasks(constrained, self.grammars.vocab_size, self.sampler.eos_token_ids, overlap=cuda)
        logits = self.runner.execute(batch)
        logits, prompt_logits = logits[: first_rows[-1]], logits[first_rows[-1] :]
        drafts = [s.draft_token_ids for s in seqs]
        spec = self.speculator  # a draft engine's distributions, for rejection sampling (prompt lookup has none)
        draft_probs = None
        if spec is not None and spec.drafter is not None:
            draft_probs = [spec.draft_probabilities(s.request, len(s.draft_token_ids)) for s in seqs]
        tokens, kept = self.sampler.verify(masks.apply(logits) if masks else logits, sampling, drafts, draft_probs)
        logprobs = self._logprobs(logits, seqs, first_rows, tokens, kept)
        if prompt_logits.shape[0]:
            score_prompts(batch, prompt_logits)
        seconds = time.perf_counter() - start
        self.model_seconds += seconds
        outputs = []
        for request, count in self.scheduler.update(batch, tokens, kept):
            if request.matcher is not None:
                count = self._advance_grammar(request, count)
            outputs.extend(self._outputs(request, count, logprobs.get(request)))
        if self.speculator is not None and all(s.num_new_tokens == s.num_rows for s in batch.seqs):
            # a pure decode step (every sequence: its last token and proposals): what proposals buy here
            proposed = any(s.draft_token_ids for s in batch.seqs)
            self.speculator.observe(len(batch.seqs), proposed, len(seqs) + sum(kept), seconds)
        return outputs

    def _logprobs(
        self,
        logits: torch.Tensor,
        seqs: list[ScheduledSeq],
        first_rows: list[int],
        tokens: list[int],
        kept: list[int],
    ) -> dict[Request, list[TokenLogprobs]]:
        """The logprobs of each new token (kept proposals, then the final one) of the requests that ask."""
        out = {}
        for seq, row, token, n in zip(seqs, first_rows, tokens, kept, strict=False):
            k = seq.request.params.logprobs
            if k is not None:
                out[seq.request] = token_logprobs(logits[row : row + n + 1], [*seq.draft_token_ids[:n], token], k)
        return out

    def _advance_grammar(self, request: Request, count: int) -> int:
        """Feed the request's `count` new tokens to its matcher; returns how many stay. A grammar that is
        complete ends the request at the token that completed it."""
        if request.is_finished:
            return count
        first = len(request.output_token_ids) - count
        for i in range(first, first + count):
            accepted = request.matcher.consume_token(request.output_token_ids[i])
            if not accepted or request.matcher.is_stopped():
                # stopped: the grammar is complete; not accepted: the matcher hit a limit (StepMasks allowed EOS)
                del request.output_token_ids[i + 1 :]
                self.scheduler.finish(request, FinishReason.STOP)
                return i + 1 - first
        return count

    def stream(self, request: Request) -> Iterator[RequestOutput]:
        """Queue one request and yield its outputs step by step until it finishes."""
        self.add_request(request)
        while not request.is_finished:
            for out in self.step():
                if out.request_id == request.request_id:
                    yield out

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, lora: str | None = None
    ) -> list[Completion]:
        """Run prompts to completion together (in-flight batched); results in prompt order."""
        requests = [self.make_request(p, params, lora=lora) for p in prompts]
        for request in requests:
            self.add_request(request)
        texts = {r.request_id: "" for r in requests}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in texts:
                    texts[out.request_id] += out.text
        return [
            Completion(
                r.request_id,
                r.prompt_token_ids,
                list(r.output_token_ids),
                texts[r.request_id],
                r.finish_reason.value if r.finish_reason else None,
            )
            for r in requests
        ]

    def _outputs(self, request: Request, count: int, logprobs: list[TokenLogprobs] | None) -> list[RequestOutput]:
        """The outputs of the request's `count` newest tokens; a stop string ends the request at its token."""
        detok = self._detokenizers[request.request_id]
        first = len(request.output_token_ids) - count
        outputs = []
        for i in range(first, first + count):
            text = detok.update(request.output_token_ids[i])
            if detok.stopped_by is not None and not request.is_finished:
                del request.output_token_ids[i + 1 :]  # kept proposals past the stop string are not output
                self.scheduler.finish(request, FinishReason.STOP)
            last = request.is_finished and i == len(request.output_token_ids) - 1
            if last:
                text += detok.flush()
                del self._detokenizers[request.request_id]
            reason = request.finish_reason.value if last and request.finish_reason else None
            scored = request.prompt_logprobs if i == 0 and request.prompt_logprobs else None
            sampled = logprobs[i - first] if logprobs else None
            outputs.append(
                RequestOutput(request.request_id, request.output_token_ids[i], text, reason, sampled, scored)
            )
            if last:
                break
        return outputs

    def _speculator(self, section: SpeculativeSection, draft: Engine | None) -> Speculator:
        if (section.method == "draft") != (draft is not None):
            given = f"draft engine {draft.path}" if draft is not None else "no draft engine"
            raise EngineError(
                f"speculative method {section.method} with {given}: method draft needs a draft engine "
                "(--draft-engine PATH), and a draft engine needs method draft"
            )
        proposer = DraftProposer(draft, self.engine, self.tokenizer) if draft is not None else None
        return Speculator(section, self.limits.max_seq_len, proposer)

    def _plan_memory(self, engine: Engine) -> MemoryPlan:
        manifest = engine.manifest
        tp = manifest.target.tensor_parallel
        plan = plan_memory(
            weight_bytes=self.workers.weight_bytes if self.workers is not None else engine.weight_bytes,
            kv_bytes_per_token=tp * rank_config(manifest.model, tp).kv_bytes_per_token(engine.kv_cache_dtype),
            limits=manifest.limits,
            kv_cache=manifest.kv_cache,
            available_bytes=available_memory_bytes(engine.device),
        )
        if plan.num_blocks < plan.blocks_per_sequence:
            raise EngineError(
                f"KV cache of {format_bytes(plan.kv_budget_bytes)} holds {plan.num_blocks} blocks, but one "
                f"max_seq_len sequence needs {plan.blocks_per_sequence}; raise kv_cache.memory_bytes / "
                "memory_fraction or lower limits.max_seq_len"
            )
        return plan


def built_in_draft(path: Path, manifest: Manifest, speculative: bool | SpeculativeSection, verify: bool) -> Path | None:
    """The draft directory of an engine built with its draft (speculative.draft) when this run speculates with
    method draft, else None. With `verify`, the draft's manifest is checked against the target's, which seals
    it; Engine.load then checks the draft's files against that manifest (each file hashed once)."""
    section = manifest.speculative if speculative is True else speculative or None
    built = manifest.speculative is not None and manifest.speculative.draft is not None
    if not built or section is None or section.method != "draft":
        return None
    if verify:
        verify_files(path, manifest, only=(f"{DRAFT_DIR}/{MANIFEST}",))
    return path / DRAFT_DIR


def score_prompts(batch: StepBatch, logits: torch.Tensor) -> None:
    """Append the prompt logprobs of the step's scored positions to their requests.

    `logits` holds one row per scored position, sequences in batch order (ModelRunner.execute).
    """
    row = 0
    for seq in batch.scoring_seqs:
        request, positions = seq.request, seq.scored_positions
        if not request.prompt_logprobs:
            request.prompt_logprobs.append(None)  # the first prompt token follows nothing
        targets = [request.prompt_token_ids[p + 1] for p in positions]
        k = request.params.prompt_logprobs or 0
        request.prompt_logprobs.extend(token_logprobs(logits[row : row + len(positions)], targets, k))
        row += len(positions)
