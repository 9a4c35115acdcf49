"""What the load generator must know about the served model: which token ids make a prompt and how long
a sequence may be. Read from the checkpoint directory when given, else from the server, else defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
from tokenizers import Tokenizer

DEFAULT_VOCAB_SIZE = 256  # without a tokenizer: ids every vocabulary has
DEFAULT_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the `model` field requests carry
    token_ids: tuple[int, ...]  # ordinary (non-special) ids prompts are drawn from
    max_model_len: int  # prompt + output must fit in this


def _checkpoint_vocab(model_dir: Path) -> tuple[int, ...]:
    """Ids of the tokenizer minus its special tokens, so prompts look like text, not control codes."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = {token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return tuple(i for i in range(tokenizer.get_vocab_size()) if i not in special)


def _checkpoint_context(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("max_position_embeddings")


def served_model(url: str) -> tuple[str | None, int | None]:
    """The first model of GET /v1/models and its context window, if the server exposes it (as vLLM does)."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=10)
        response.raise_for_status()
        card = response.json()["data"][0]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None, None
    return card.get("id"), card.get("max_model_len")


def resolve_model_info(url: str | None, model_dir: Path | None, max_model_len: int | None) -> ModelInfo:
    """Explicit options win, then the server's model card, then the checkpoint's config, then defaults."""
    served_name, served_len = served_model(url) if url else (None, None)
    checkpoint_len = _checkpoint_context(model_dir) if model_dir else None
    token_ids = _checkpoint_vocab(model_dir) if model_dir else tuple(range(3, DEFAULT_VOCAB_SIZE))
    name = served_name or (model_dir.name if model_dir else "default")
    return ModelInfo(
        name=name,
        token_ids=token_ids,
        max_model_len=max_model_len or served_len or checkpoint_len or DEFAULT_MAX_MODEL_LEN,
    )
