"""Incremental detokenization and stop strings.

Text is produced token by token with `tokenizers`' DecodeStream, which holds back bytes of an
unfinished multi-byte character, so a character is never split across two deltas. Stop strings
are searched across token boundaries; until a request finishes, the tail that could still be the
start of a stop string is held back, so no emitted text ever has to be taken back.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas; detects stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        # Seeding the stream with the prompt's tail makes the first token's leading space right. A prompt
        # given as token ids may end inside a character, or with bytes that are no character at all: those
        # bytes are the prompt's, so they stay out of the seed (else the first delta would carry them).
        context = [t for t in prompt_token_ids[-8:] if t < self._vocab]
        while context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            context.pop()
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped_by: str | None = None

    def update(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit (may be '')."""
        if self.stopped_by is not None:
            return ""
        piece = self._stream.step(self._tokenizer, token_id) if token_id < self._vocab else None
        if piece:
            start = max(0, len(self.text) - self._hold)
            self.text += piece
            hits = [(at, s) for s in self._stop if (at := self.text.find(s, start)) != -1]
            if hits:
                at, s = min(hits)
                self.text, self.stopped_by = self.text[:at], s
        safe = len(self.text) if self.stopped_by is not None else len(self.text) - self._hold
        return self._emit(max(safe, self._emitted))

    def flush(self) -> str:
        """At the end of the request: everything not yet emitted."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
