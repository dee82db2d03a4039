"""LoRA adapters registered while serving: vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless the server was started with --allow-adapter-loading (they read any directory the server can
read), and behind the API key like every model route. A load reads and checks the adapter off the event
loop and registers it only when it is whole, so a bad adapter changes nothing; an unload stops new
requests from naming the adapter while requests already running with it finish.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from llmbuild.errors import LoraError, RequestError
from llmbuild.serve.api_error import APIError
from llmbuild.serve.context import ServeContext
from llmbuild.serve.intake import ignored_header, read_body
from llmbuild.serve.request_model import RequestModel


class LoadLoraAdapterRequest(RequestModel):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(RequestModel):
    lora_name: str


def _check_enabled(ctx: ServeContext) -> None:
    if not ctx.config.allow_adapter_loading:
        raise APIError(404, "adapter loading is off; start the server with --allow-adapter-loading", "not_found_error")
    if ctx.llm.loras is None:
        raise APIError(400, "this engine has no LoRA slots; rebuild it with a recipe `lora` section")


async def load_lora_adapter(ctx: ServeContext, request: Request) -> Response:
    """Register the adapter at `lora_path` as the model `lora_name` (400 naming what is wrong, nothing changed)."""
    _check_enabled(ctx)
    body = await read_body(ctx, request, LoadLoraAdapterRequest)
    if body.lora_name == ctx.model_name:
        raise APIError(400, f"lora_name '{body.lora_name}' is the base model's name; pick another", param="lora_name")
    assert ctx.llm.loras is not None  # _check_enabled
    try:
        await asyncio.to_thread(ctx.llm.loras.register, body.lora_name, body.lora_path)
    except (LoraError, RequestError) as exc:
        raise APIError(400, str(exc), param="lora_path") from None
    return PlainTextResponse(
        f"Success: LoRA adapter '{body.lora_name}' added successfully.", headers=ignored_header(body)
    )


async def unload_lora_adapter(ctx: ServeContext, request: Request) -> Response:
    """Stop serving the adapter `lora_name` (404 if none is loaded under that name)."""
    _check_enabled(ctx)
    body = await read_body(ctx, request, UnloadLoraAdapterRequest)
    assert ctx.llm.loras is not None  # _check_enabled
    try:
        ctx.llm.loras.unregister(body.lora_name)
    except RequestError as exc:
        raise APIError(404, str(exc), "not_found_error", "lora_name") from None
    return PlainTextResponse(
        f"Success: LoRA adapter '{body.lora_name}' removed successfully.", headers=ignored_header(body)
    )
