"""Small random-weight Hugging Face checkpoints made locally (no model hub), for tests and benchmarks.

A checkpoint is a transformers model with random weights (fixed seed) plus a byte-level BPE
tokenizer trained with `tokenizers` on text that ships with CPython (pydoc's topic help, the
Python documentation's own prose, PSF licence), and a ChatML chat template that renders tools (the
demo model's, models/demo/chat_template.jinja). The demo default is a trained model instead:
models/demo, made by tools/train_demo_model.py (on this module's DEMO_SHAPE and tokenizer trainer).
`python tools/make_demo_checkpoint.py --out DIR` writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    # ChatML; with `tools`, Hermes / Qwen2.5 tool calling: the tools as JSON in a system turn, calls as
    # <tool_call> blocks of {"name", "arguments"} JSON, results as `tool` turns in <tool_response>.
    # Without tools and tool messages it renders exactly the plain ChatML template it extends.
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within"
    " <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% endif %}{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'tool' %}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}<tool_call>\n"
    "{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
DEMO_SHAPE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    vocab_size=4096,
)


def corpus() -> list[str]:
    """English prose from the Python standard library's pydoc topics, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on corpus() and save it (transformers format, with chat template)."""
    train_tokenizer_on(out_dir, corpus(), vocab_size)


def train_tokenizer_on(out_dir: Path, texts: list[str], vocab_size: int) -> None:
    """Train a byte-level BPE on texts and save it (transformers format, with chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)


def make_checkpoint(
    out_dir: Path,
    architecture: str = "LlamaForCausalLM",
    dtype: str = "bfloat16",
    seed: int = 0,
    tokenizer_from: Path | None = None,
    tokenizer_vocab: int = 4096,
    shard_size: str | None = None,
    **config: Any,
) -> Path:
    """Write a random-weight checkpoint of `architecture` with the given config overrides.

    The tokenizer is trained (or copied from `tokenizer_from`); `shard_size` (e.g. "200KB") writes a
    sharded checkpoint with model.safetensors.index.json.
    """
    import shutil

    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out_dir / f.name)
    else:
        train_tokenizer(out_dir, tokenizer_vocab)
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, architecture)
    cfg = config_cls(**{**DEMO_SHAPE, "bos_token_id": 1, "eos_token_id": 2, **config})
    torch.manual_seed(seed)
    model = model_cls(cfg).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir
