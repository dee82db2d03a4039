"""`llmbuild run ENGINE`: one completion in the terminal (text streamed, or one JSON line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmbuild.cli.console import console
from llmbuild.cli.lora_options import lora_option
from llmbuild.cli.speculative_options import engine_speculation, speculative_options

if TYPE_CHECKING:
    from llmbuild.runtime.llm_engine import LLMEngine


@click.command("run")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as a JSON list of token ids, e.g. '[5, 17, 42]'.")
@click.option("--chat", is_flag=True, help="Wrap --prompt as a user message in the engine's chat template.")
@click.option("--max-tokens", type=int, help="Most tokens to generate (default: the engine's serve.max_tokens).")
@click.option("--temperature", type=float, help="0 = greedy (default: the engine's serve.temperature).")
@click.option("--top-p", type=float, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = off).")
@click.option(
    "--min-p",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop tokens below min_p x the top probability.",
)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stop-token-id", type=int, multiple=True, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS.")
@click.option(
    "--output",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one line {token_ids, text, finish_reason, num_draft_tokens, num_accepted_tokens}.",
)
@click.option(
    "--backend",
    type=click.Choice(["compiled", "eager"]),
    help="Override the engine's backend (eager runs a compiled engine's exported program, for debugging).",
)
@speculative_options
@lora_option
@click.option(
    "--model", "model_name", metavar="NAME", help="Generate with the --lora adapter NAME (default: the base)."
)
def run_command(
    engine: Path,
    lora: tuple[tuple[str, Path], ...],
    model_name: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    chat: bool,
    output_format: str,
    backend: str | None,
    speculative: bool | None,
    num_speculative_tokens: int | None,
    draft_engine: Path | None,
    **sampling: Any,
) -> None:
    """Generate one completion with ENGINE in the terminal."""
    from llmbuild.runtime.llm_engine import LLMEngine
    from llmbuild.runtime.lora_manager import register_adapters

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    if chat and prompt is None:
        raise click.UsageError("--chat needs --prompt")
    if model_name is not None and model_name not in dict(lora):
        raise click.UsageError(f"--model {model_name}: no --lora {model_name}=DIR names that adapter")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    spec = engine_speculation(engine, speculative, num_speculative_tokens, draft_engine)
    with LLMEngine.from_dir(engine, backend=backend, speculative=spec, draft_engine=draft_engine) as llm:
        register_adapters(llm.loras, llm.engine.path, lora, llm.engine.manifest.name)
        _generate(llm, prompt, ids, chat, output_format, sampling, model_name)


def _generate(
    llm: LLMEngine,
    prompt: str | None,
    ids: list[int] | None,
    chat: bool,
    output_format: str,
    sampling: dict[str, Any],
    lora: str | None = None,
) -> None:
    """`run`'s generation: sampling defaults from the engine, text streamed to stdout (or one JSON line)."""
    from llmbuild.runtime.sampling_params import resolve_sampling_params

    params = resolve_sampling_params(
        llm.engine.manifest.serve,
        stop=tuple(sampling.pop("stop")),
        stop_token_ids=tuple(sampling.pop("stop_token_id")),
        **sampling,
    )
    if chat:
        ids = _chat_prompt(llm, prompt or "")
    request = llm.make_request(ids if ids is not None else prompt or "", params, lora=lora)
    text = []
    for out in llm.stream(request):
        text.append(out.text)
        if output_format == "text":
            sys.stdout.write(out.text)
            sys.stdout.flush()
    reason = request.finish_reason.value if request.finish_reason else None
    drafted, accepted = request.num_draft_tokens, request.num_accepted_tokens
    if output_format == "json":
        result = {"token_ids": request.output_token_ids, "text": "".join(text), "finish_reason": reason}
        click.echo(json.dumps({**result, "num_draft_tokens": drafted, "num_accepted_tokens": accepted}))
        return
    sys.stdout.write("\n")
    summary = f"{len(request.output_token_ids)} tokens, finish_reason={reason}"
    if drafted:
        summary += f", {accepted} of {drafted} proposed tokens accepted"
    console(stderr=True).print(f"[dim]{summary}[/]")


def _chat_prompt(llm: Any, prompt: str) -> list[int]:
    from llmbuild.errors import RequestError
    from llmbuild.runtime.chat_template import NoChatTemplateError, apply_chat_template

    try:
        return apply_chat_template(llm.tokenizer, [{"role": "user", "content": prompt}])
    except NoChatTemplateError as exc:
        raise RequestError(f"{exc}; drop --chat") from None


def _parse_ids(text: str) -> list[int]:
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise click.BadParameter("must be a JSON list of integers, e.g. '[5, 17, 42]'", param_hint="--prompt-ids")
    return ids
