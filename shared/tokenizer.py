"""Tokenizers for the gateway and the CLI: a checkpoint's tokenizer.json (with its special-token and
chat-template settings), or the byte-level tokenizer of the built-in model.

Only the `tokenizers` library is used, never transformers, so the gateway stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, processors

from paged.shared.sampling_params import GenerationDefaults

# The built-in model's vocabulary (worker/builtin_model.py): three specials, then byte b at id 3 + b,
# spelled "<0xNN>" as in Llama's byte-fallback tokens.
BUILTIN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BUILTIN_BOS_ID = 1
BUILTIN_EOS_ID = 2
BUILTIN_FIRST_BYTE_ID = len(BUILTIN_SPECIAL_TOKENS)  # byte b is token BUILTIN_FIRST_BYTE_ID + b
BUILTIN_VOCAB_SIZE = BUILTIN_FIRST_BYTE_ID + 256

# generation_config.json fields that are sampling defaults -> the GenerationDefaults field each fills.
GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


class TokenizerLoadError(RuntimeError):
    """The tokenizer files of a model directory are missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Tokenizer:
    backend: BackendTokenizer
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: frozenset[int]  # any of these ends a sequence
    chat_template: str | None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens, BOS (etc.) as the tokenizer.json post-processor adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for many texts at once; unlike encode(), it releases the GIL while it works."""
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory; None gives the built-in byte-level one."""
    if model_dir is None:
        return builtin_tokenizer()
    root = Path(model_dir)
    path = root / "tokenizer.json"
    if not path.is_file():
        raise TokenizerLoadError(f"{path}: file not found")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a bare Exception on malformed files
        raise TokenizerLoadError(f"{path}: cannot parse ({exc})") from None
    tokenizer_config = read_json(root / "tokenizer_config.json")
    special_tokens_map = read_json(root / "special_tokens_map.json")
    bos_token = token_string(tokenizer_config.get("bos_token") or special_tokens_map.get("bos_token"))
    eos_token = token_string(tokenizer_config.get("eos_token") or special_tokens_map.get("eos_token"))
    config = read_json(root / "config.json")
    bos_token_id = backend.token_to_id(bos_token) if bos_token else config.get("bos_token_id")
    eos_ids = set(as_ids(config.get("eos_token_id"))) | set(as_ids(read_json(root / "generation_config.json").get("eos_token_id")))
    if eos_token and backend.token_to_id(eos_token) is not None:
        eos_ids.add(backend.token_to_id(eos_token))
    return Tokenizer(backend, bos_token, eos_token, bos_token_id, frozenset(eos_ids), chat_template(root, tokenizer_config))


def builtin_tokenizer() -> Tokenizer:
    """Every UTF-8 byte is a token: BPE with no merges and byte fallback turns each character into its bytes."""
    vocab = {token: i for i, token in enumerate(BUILTIN_SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": BUILTIN_FIRST_BYTE_ID + b for b in range(256)})
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(list(BUILTIN_SPECIAL_TOKENS))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BUILTIN_BOS_ID)])
    bos, eos = BUILTIN_SPECIAL_TOKENS[BUILTIN_BOS_ID], BUILTIN_SPECIAL_TOKENS[BUILTIN_EOS_ID]
    return Tokenizer(backend, bos, eos, BUILTIN_BOS_ID, frozenset({BUILTIN_EOS_ID}), None)


def load_generation_defaults(model_dir: str | Path | None) -> GenerationDefaults:
    """The sampling defaults a checkpoint ships in generation_config.json (none for the built-in
    model). Its eos_token_id is read by load_tokenizer: any of them ends a sequence."""
    if model_dir is None:
        return GenerationDefaults()
    path = Path(model_dir) / "generation_config.json"
    config = read_json(path)
    values = {field: config[key] for key, field in GENERATION_DEFAULT_KEYS.items() if config.get(key) is not None}
    try:
        return msgspec.convert(values, GenerationDefaults)
    except msgspec.ValidationError as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from None


def chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """transformers 5 saves the template beside the config as chat_template.jinja; older checkpoints inline it,
    sometimes as a list of named templates of which "default" is the chat one."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default")
    return template


def read_json(path: Path) -> dict[str, Any]:
    """An optional JSON file: missing is empty, malformed is an error naming it."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerLoadError(f"{path}: invalid JSON ({exc})") from None


def token_string(token: str | dict[str, Any] | None) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts with a "content" field."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
