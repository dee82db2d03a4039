"""From a validated request body to engine requests: sampling parameters, then n requests per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from llmbuild.errors import RequestError
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.runtime.sampling_params import SamplingParams, resolve_sampling_params
from llmbuild.runtime.structured_output import Grammar
from llmbuild.serve.api_error import APIError
from llmbuild.serve.context import ServeContext
from llmbuild.serve.protocol import GenerationRequest, Prompt


def sampling_params(ctx: ServeContext, body: GenerationRequest) -> SamplingParams:
    """The body's sampling options over the engine's defaults, max_tokens capped at max_seq_len (400 if refused)."""
    try:
        return resolve_sampling_params(
            ctx.defaults,
            # max_tokens 0 scores the prompt: the engine samples one token, which the response drops (choice.py)
            max_tokens=body.requested_max_tokens or (1 if body.requested_max_tokens == 0 else None),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=None if body.top_k is None else max(body.top_k, 0),  # -1 is off, as 0 is
            max_seq_len=ctx.max_seq_len,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=body.stop_strings,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens,
            logprobs=body.num_logprobs,
            prompt_logprobs=body.num_prompt_logprobs,
            logit_bias=body.logit_bias_pairs,
            structured=check_grammar(ctx, body),
            speculate=body.speculate,
        )
    except RequestError as exc:
        raise APIError(400, str(exc)) from None


def check_grammar(ctx: ServeContext, body: GenerationRequest) -> Grammar | None:
    """The body's output constraint, compiled once here (cached for the engine's requests) so that a bad
    one is a 400 naming its field. Blocking, bounded by the compiler's time limit: call off the event loop."""
    if body.grammar is None:
        return None
    field, grammar = body.grammar
    try:
        ctx.llm.grammars.matcher(grammar)
    except RequestError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from None
    return grammar


def make_requests(
    ctx: ServeContext,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    n: int,
    request_id: str,
    priority: int = 0,
    lora: str | None = None,
) -> list[EngineRequest]:
    """n requests per prompt, the n of a prompt consecutive; with a seed, choice j draws from seed + j.

    The engine requests are named for the HTTP request: `request_id` itself when there is one,
    else `<request_id>-<i>` for the i-th (prompt-major), so that the ids in the engine stay unique.

    Tokenizes text prompts (blocking work: call it off the event loop). 400 for an empty or too
    long prompt, or one the engine refuses. `lora` names the adapter the requests run with (None: the base).
    """
    requests: list[EngineRequest] = []
    single = len(prompts) * n == 1
    for prompt in prompts:
        if not prompt:  # "" would still tokenize to a BOS token: refuse it as the empty prompt it is
            raise APIError(400, "prompt: must not be empty", param="prompt")
        ids = ctx.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if len(ids) > ctx.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt has {len(ids)} tokens; this server accepts at most {ctx.max_prompt_tokens}",
                param="prompt",
            )
        for j in range(n):
            p = params
            if params.seed is not None and j:
                p = replace(params, seed=(params.seed + j) % (2**63))
            try:
                engine_id = request_id if single else f"{request_id}-{len(requests)}"
                requests.append(ctx.llm.make_request(ids, p, request_id=engine_id, priority=priority, lora=lora))
            except RequestError as exc:
                if lora is not None and lora not in ctx.adapter_names():  # unloaded since check_model
                    raise APIError(404, str(exc), "not_found_error", "model") from None
                raise APIError(400, str(exc), param="prompt") from None
    return requests
