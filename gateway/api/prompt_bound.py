"""The most characters one token can stand for, read off a tokenizer's definition, so that a prompt
too long for the context window is refused from its length alone, before it is tokenized (about half
a second per megabyte of text for a Llama tokenizer).

A text of C characters makes at least ceil(C / K) tokens when no token covers more than K characters.
That holds only where tokenizing never drops or shrinks text:
- the normalizer only keeps or adds characters (prepending, replacing a string by one at least as
  long, decomposing, lowercasing); composing (NFC/NFKC), stripping or a precompiled charsmap can shrink;
- the pre-tokenizer removes nothing (whitespace splitters drop the whitespace);
- the model turns every character into tokens: byte fallback, or byte-level BPE, rather than one
  <unk> for a whole run of unknown characters (or nothing, where BPE has no unk token);
- no added token absorbs the whitespace around it (lstrip/rstrip).
K is then the longest vocabulary entry: a BPE or Unigram piece spells the (normalized) text it covers,
a byte-level piece one character per byte, a byte-fallback piece (<0xE2>) at most one character, and an
added token its content. For any other tokenizer there is no bound (None): only the token count,
computed off the event loop, decides.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from paged.gateway.api.errors import APIError
from paged.shared.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_KEEPING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}


def max_chars_per_token(tokenizer: Tokenizer) -> int | None:
    """K as above, or None where tokenizing may shrink the text without bound."""
    spec = json.loads(tokenizer.backend.to_str())
    normalizers = _flatten(spec.get("normalizer"), "normalizers")
    pre_tokenizers = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    model = spec.get("model") or {}
    byte_level = any(p["type"] == "ByteLevel" for p in pre_tokenizers)
    every_char_tokenized = model.get("type") in ("BPE", "Unigram") and (model.get("byte_fallback") or byte_level)
    if not (
        every_char_tokenized
        and all(_keeps_text(n) for n in normalizers)
        and all(p["type"] in _KEEPING_PRE_TOKENIZERS and p.get("behavior") != "Removed" for p in pre_tokenizers)
        and not any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])
    ):
        return None
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max(1 if _BYTE_PIECE.fullmatch(piece) else len(piece) for piece in vocab)


def check_prompt_chars(text: str, max_chars: int | None, max_model_len: int, param: str) -> None:
    """400 when `text` cannot fit the context window whatever its tokens turn out to be."""
    if max_chars is None:
        return
    min_tokens = math.ceil(len(text) / max_chars)
    if min_tokens >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt's {len(text)} "
            f"characters make at least {min_tokens} tokens, which leaves no room for a completion.",
            param=param,
            code="context_length_exceeded",
        )


def _flatten(component: dict[str, Any] | None, members: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as the list of its parts (a Sequence nests them)."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [part for child in component[members] for part in _flatten(child, members)]
    return [component]


def _keeps_text(normalizer: dict[str, Any]) -> bool:
    if normalizer["type"] == "Replace":
        pattern = normalizer["pattern"].get("String")  # a regex pattern may match any length
        return pattern is not None and len(normalizer["content"]) >= len(pattern)
    return normalizer["type"] in _KEEPING_NORMALIZERS
