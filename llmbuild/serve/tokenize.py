"""POST /tokenize and /detokenize (vLLM's shapes): the engine's tokenizer, for clients that count or
check tokens before they send a request (lm-eval, guidellm)."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmbuild.runtime.chat_template import (
    ChatTemplateError,
    NoChatTemplateError,
    NoToolTemplateError,
    apply_chat_template,
)
from llmbuild.serve.api_error import APIError
from llmbuild.serve.chat import no_tools
from llmbuild.serve.context import ServeContext
from llmbuild.serve.intake import check_model, ignored_header, read_body
from llmbuild.serve.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(ctx: ServeContext, request: Request) -> Response:
    """The /tokenize handler: `{"tokens", "count", "max_model_len"}` (+ `token_strs` when asked)."""
    body = await read_body(ctx, request, TokenizeRequest)
    check_model(ctx, body.model)
    ids = await asyncio.to_thread(token_ids, ctx, body)
    out: dict = {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_seq_len}
    if body.return_token_strs:
        out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
    return JSONResponse(out, headers=ignored_header(body))


def token_ids(ctx: ServeContext, body: TokenizeRequest) -> list[int]:
    """The body's prompt or messages as token ids, as generation would see them (blocking work)."""
    if body.prompt is not None:
        add_special = body.add_special_tokens is not False  # default true for a prompt, as vLLM
        return list(ctx.tokenizer.encode(body.prompt, add_special_tokens=add_special))
    try:
        return apply_chat_template(
            ctx.tokenizer, body.template_messages(), body.add_generation_prompt, body.template_tools()
        )
    except NoChatTemplateError as exc:
        raise APIError(400, f"{exc}; tokenize a prompt instead", param="messages") from None
    except NoToolTemplateError as exc:
        raise no_tools(exc, bool(body.tools)) from None
    except ChatTemplateError as exc:
        raise APIError(400, f"messages do not fit the engine's chat template: {exc}", param="messages") from None


async def detokenize(ctx: ServeContext, request: Request) -> Response:
    """The /detokenize handler: `{"prompt"}`, the ids' text; 400 naming the first id out of the vocabulary."""
    body = await read_body(ctx, request, DetokenizeRequest)
    check_model(ctx, body.model)
    vocab = ctx.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens.{bad}: token id {body.tokens[bad]} is out of range [0, {vocab})", param="tokens")
    text = await asyncio.to_thread(ctx.tokenizer.decode, body.tokens)
    return JSONResponse({"prompt": text}, headers=ignored_header(body))
