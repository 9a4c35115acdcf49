"""The checkpoint tokenizer (stories260K) and the built-in byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from paged.shared.sampling_params import GenerationDefaults
from paged.shared.tokenizer import (
    BUILTIN_SPECIAL_TOKENS,
    BUILTIN_VOCAB_SIZE,
    TokenizerLoadError,
    builtin_tokenizer,
    load_generation_defaults,
    load_tokenizer,
)


def test_stories_encodes_with_bos(stories_dir: Path) -> None:
    tokenizer = load_tokenizer(stories_dir)
    assert tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tokenizer.encode("Once upon a time", add_special_tokens=False) == [403, 407, 261, 378]
    assert tokenizer.convert_ids_to_tokens([1, 403]) == ["<s>", "▁Once"]


def test_stories_special_tokens(stories_dir: Path) -> None:
    tokenizer = load_tokenizer(stories_dir)
    # config.json says 2, generation_config.json says [2, 1]: both end a sequence.
    assert tokenizer.eos_token_ids == frozenset({1, 2})
    assert tokenizer.bos_token_id == 1
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.vocab_size == 512
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("text", ["Once upon a time", "Tom and  Lily went\nhome. Ünïcode ✓ 😀", ""])
def test_stories_roundtrip(stories_dir: Path, text: str) -> None:
    tokenizer = load_tokenizer(stories_dir)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False).startswith("<s>")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_builtin_roundtrips_any_text(text: str) -> None:
    assume(not any(special in text for special in BUILTIN_SPECIAL_TOKENS))  # those encode as one special id
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte
    assert all(0 <= i < BUILTIN_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text


def test_builtin_special_token_text_is_the_special_id() -> None:
    """Like checkpoint tokenizers, "</s>" typed in a prompt is the special token, not four bytes."""
    tokenizer = builtin_tokenizer()
    assert tokenizer.encode("a</s>", add_special_tokens=False) == [3 + ord("a"), 2]
    assert tokenizer.decode([3 + ord("a"), 2]) == "a"
    assert tokenizer.decode([3 + ord("a"), 2], skip_special_tokens=False) == "a</s>"


def test_builtin_layout_matches_builtin_model() -> None:
    from paged.worker.builtin_model import BUILTIN_ARCH

    tokenizer = load_tokenizer(None)
    assert tokenizer.vocab_size == BUILTIN_ARCH.vocab_size
    assert tokenizer.bos_token_id == BUILTIN_ARCH.bos_token_id
    assert tokenizer.eos_token_ids == frozenset(BUILTIN_ARCH.eos_token_ids)
    assert tokenizer.encode("A", add_special_tokens=False) == [3 + ord("A")]


def test_chat_template_and_generation_defaults(tmp_path: Path, stories_dir: Path) -> None:
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((stories_dir / name).read_bytes())
    config = json.loads((stories_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.9, "eos_token_id": 5}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == config["chat_template"]
    assert tokenizer.eos_token_ids == frozenset({2, 5})
    assert load_generation_defaults(tmp_path) == GenerationDefaults(temperature=0.7, top_p=0.9)


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="tokenizer.json: file not found"):
        load_tokenizer(tmp_path)
