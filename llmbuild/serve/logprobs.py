"""Logprobs in the response formats: OpenAI's completions and chat shapes, and vLLM's prompt_logprobs.

The completions shape lists tokens, their logprobs, the top alternatives and where each token's text
starts; with `echo` the prompt's tokens come first, the first of them with null logprob and
alternatives (nothing precedes it). As in OpenAI's API, a token's alternatives include the token
itself, so there may be logprobs + 1 of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmbuild.runtime.logprobs import TokenLogprobs


@dataclass(frozen=True, slots=True)
class _Entry:
    token_id: int
    lp: TokenLogprobs | None
    offset: int


class LogprobsBuilder:
    """Accumulates one choice's logprobs in the completions or the chat format."""

    def __init__(self, decode: Callable[[int], str], chat: bool, k: int) -> None:
        self._decode = decode
        self._chat = chat
        self._k = k
        self._entries: list[_Entry] = []
        self._sent = 0

    def add(self, lp: TokenLogprobs, offset: int) -> None:
        """Record one generated token's logprobs; `offset` is where its text starts in the choice's text."""
        self._entries.append(_Entry(lp.token_id, lp, offset))

    def add_prompt(self, token_ids: list[int], scored: list[TokenLogprobs | None]) -> None:
        """Record the echoed prompt's tokens (scored[i] scores token i; scored[0] is None), text from offset 0."""
        offset = 0
        for token, lp in zip(token_ids, scored, strict=True):
            self._entries.append(_Entry(token, lp, offset))
            offset += len(self._decode(token))

    def body(self) -> dict:
        """Every entry so far (for a whole, non-streamed response)."""
        return self._format(self._entries)

    def take(self) -> dict:
        """The entries added since the last take (for one streamed chunk)."""
        entries, self._sent = self._entries[self._sent :], len(self._entries)
        return self._format(entries)

    def _format(self, entries: list[_Entry]) -> dict:
        d = self._decode
        if self._chat:
            return {
                "content": [
                    {
                        "token": (tok := d(e.token_id)),
                        "logprob": e.lp.logprob,
                        "bytes": list(tok.encode()),
                        "top_logprobs": [
                            {"token": (t := d(i)), "logprob": v, "bytes": list(t.encode())}
                            for i, v in e.lp.top[: self._k]
                        ],
                    }
                    for e in entries
                    if e.lp is not None
                ]
            }
        return {
            "tokens": [d(e.token_id) for e in entries],
            "token_logprobs": [e.lp.logprob if e.lp else None for e in entries],
            "top_logprobs": [self._top(e.lp) if e.lp else None for e in entries],
            "text_offset": [e.offset for e in entries],
        }

    def _top(self, lp: TokenLogprobs) -> dict[str, float]:
        top = {self._decode(i): v for i, v in lp.top[: self._k]}
        top.setdefault(self._decode(lp.token_id), lp.logprob)
        return top


def prompt_logprobs_body(
    token_ids: list[int], scored: list[TokenLogprobs | None], k: int, decode: Callable[[int], str]
) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the token itself and the k most likely tokens at its position."""
    out: list[dict[str, dict] | None] = []
    for token, lp in zip(token_ids, scored, strict=True):
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(i): {"logprob": v, "rank": rank, "decoded_token": decode(i)}
            for rank, (i, v) in enumerate(lp.top[:k], 1)
        }
        entry.setdefault(str(token), {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": decode(token)})
        out.append(entry)
    return out
