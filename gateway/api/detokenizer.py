"""Incremental detokenization: text for each new token, never half a UTF-8 character.

Decoding one token at a time is wrong twice over: byte-fallback tokens (<0xE2><0x98><0x83>) are
only a character together, and SentencePiece-style decoders strip the leading space of whatever
they decode first. So each step decodes a short window that starts a few tokens back, and emits
what it adds beyond the same window without the new tokens. A window ending in U+FFFD is an
incomplete character: nothing is emitted until a later token completes it (or the sequence ends).
"""

from __future__ import annotations

from typing import Protocol

# Tokens of the prompt kept as context, so the first generated token decodes with its leading space.
PROMPT_CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # tokens before this have been emitted as text

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still incomplete."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back, replacement characters included."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(window)
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
