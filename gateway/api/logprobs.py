"""Log probabilities in OpenAI's two shapes: completions (parallel lists) and chat (one entry per
token with its bytes). Token strings are what each token contributes to the text."""

from __future__ import annotations

import re
from typing import Any

from paged.shared.protocol import TokenLogprob
from paged.shared.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


class TokenStrings:
    """Token id -> (text, bytes), cached. decode([id]) is right for byte-level BPE, but it drops a
    SentencePiece token's leading space and turns a byte-fallback token into U+FFFD; those two are
    read off the vocabulary entry instead."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._lookup(token_id)
        return cached

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0] or ""
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            raw = bytes([int(byte.group(1), 16)])
            return raw.decode("utf-8", errors="backslashreplace"), raw
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if piece.startswith(_SENTENCEPIECE_SPACE) and not text.startswith(" "):
            text = " " + text
        return text, text.encode()


def completion_logprobs(
    strings: TokenStrings,
    token_ids: list[int],
    logprobs: list[float],
    top: list[list[TokenLogprob]] | None,
    text_offset: int,
) -> dict[str, Any]:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` for a run of tokens whose text
    starts `text_offset` characters into the choice's text."""
    tokens = [strings.get(t)[0] for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{strings.get(a.token_id)[0]: a.logprob for a in alts} for alts in top] if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(
    strings: TokenStrings, token_ids: list[int], logprobs: list[float], top: list[list[TokenLogprob]] | None
) -> list[dict[str, Any]]:
    """The entries of `choices[i].logprobs.content`."""
    return [
        {
            **_chat_entry(strings, token_id, logprob),
            "top_logprobs": [_chat_entry(strings, a.token_id, a.logprob) for a in top[i]] if top else [],
        }
        for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=True))
    ]


def _chat_entry(strings: TokenStrings, token_id: int, logprob: float) -> dict[str, Any]:
    text, raw = strings.get(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}
