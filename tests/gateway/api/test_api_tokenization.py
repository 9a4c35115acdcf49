"""Tokenization and chat-template rendering never run on the event loop, and a prompt whose length
alone rules it out is refused before it is tokenized (gateway/api/prompt_tokenizer.py, prompt_bound.py)."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from paged.gateway.api.app import build_app
from paged.gateway.api.prompt_bound import max_chars_per_token
from paged.shared.tokenizer import Tokenizer, builtin_tokenizer, load_tokenizer
from support.api_fixtures import MODEL, story_ids, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine, cycling_script

CHAT = "/v1/chat/completions"
LIVENESS_S = 30.0  # generous: /health must answer at all while a request is held in tokenization


class Gate:
    """Holds every call of a wrapped function until opened, and counts the calls."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def wrap(self, function: Any) -> Any:
        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.entered.set()
            assert self.open.wait(LIVENESS_S), "never opened"
            return function(*args, **kwargs)

        return held


@pytest.fixture
def gate(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(Tokenizer, "encode_batch", gate.wrap(Tokenizer.encode_batch))
    yield gate
    gate.open.set()


@pytest.fixture
async def client(tokenizer: Tokenizer, story_ids: list[int]) -> AsyncIterator[httpx.AsyncClient]:
    engine = FakeEngine(cycling_script(story_ids))
    async with serving(build_app(engine, tokenizer, MODEL)) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
async def test_the_loop_serves_while_a_prompt_is_tokenized(client: httpx.AsyncClient, gate: Gate, path: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 3} if path != CHAT else {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    held = asyncio.create_task(client.post(path, json=body))
    assert await asyncio.to_thread(gate.entered.wait, LIVENESS_S)
    health = await asyncio.wait_for(client.get("/health"), LIVENESS_S)  # on the loop tokenizer, this never answers
    assert health.status_code == 200 and not held.done()
    gate.open.set()
    response = await held
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


async def test_the_loop_serves_while_a_chat_template_renders(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paged.gateway.api.chat_template import ChatTemplate

    gate = Gate()
    monkeypatch.setattr(ChatTemplate, "render_messages", gate.wrap(ChatTemplate.render_messages))
    held = asyncio.create_task(client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
    try:
        assert await asyncio.to_thread(gate.entered.wait, LIVENESS_S)
        assert (await asyncio.wait_for(client.get("/health"), LIVENESS_S)).status_code == 200
    finally:
        gate.open.set()
    assert (await held).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
async def test_a_megabytes_prompt_is_refused_untokenized(client: httpx.AsyncClient, gate: Gate, path: str) -> None:
    huge = "Once upon a time " * (7_500_000 // 17)  # 7.5 MB, under the 8 MiB body limit
    body = {"prompt": huge} if path != CHAT else {"messages": [{"role": "user", "content": huge}]}
    response = await client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == ("messages" if path == CHAT else "prompt")
    assert "at least" in error["message"] and gate.calls == 0


async def test_a_prompt_near_the_bound_is_still_tokenized(client: httpx.AsyncClient, tokenizer: Tokenizer) -> None:
    """The bound only refuses what cannot fit: a long prompt of long tokens gets the exact count."""
    bound = max_chars_per_token(tokenizer)
    assert bound is not None
    text = "Once upon a time " * 60  # ~1000 characters, fewer than 512 tokens
    assert math.ceil(len(text) / bound) < 512 < len(text)
    response = await client.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert response.status_code == 200, response.text


def test_bounds_of_the_tokenizers_paged_ships_with(tokenizer: Tokenizer) -> None:
    assert max_chars_per_token(builtin_tokenizer()) == len("<unk>")  # bytes, and the special tokens typed out
    stories = max_chars_per_token(tokenizer)
    assert stories is not None and stories == max(len(p) for p in tokenizer.backend.get_vocab(with_added_tokens=True) if not p.startswith("<0x"))


def _wrapped(backend: BackendTokenizer) -> Tokenizer:
    return Tokenizer(backend, None, None, None, frozenset(), None)


def _byte_fallback_bpe() -> BackendTokenizer:
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁upon": 257, "▁a▁time": 258}
    return BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))


def test_no_bound_where_tokenizing_can_shrink_the_text() -> None:
    assert max_chars_per_token(_wrapped(_byte_fallback_bpe())) == len("▁a▁time")
    unk = BackendTokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", fuse_unk=True))
    assert max_chars_per_token(_wrapped(unk)) is None  # a run of unknown characters is one <unk>
    assert max_chars_per_token(_wrapped(BackendTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))) is None
    for normalizer in (normalizers.NFC(), normalizers.Strip(), normalizers.Replace("  ", " "), normalizers.StripAccents()):
        backend = _byte_fallback_bpe()
        backend.normalizer = normalizer
        assert max_chars_per_token(_wrapped(backend)) is None, normalizer
    backend = _byte_fallback_bpe()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # drops the whitespace
    assert max_chars_per_token(_wrapped(backend)) is None
    backend = _byte_fallback_bpe()
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁"), normalizers.NFKD()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Metaspace()])
    assert max_chars_per_token(_wrapped(backend)) == len("▁a▁time")


_load_tokenizer = functools.cache(load_tokenizer)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_the_bound_never_exceeds_the_real_token_count(stories_dir: Path, text: str) -> None:
    for tokenizer in (_load_tokenizer(None), _load_tokenizer(stories_dir)):
        bound = max_chars_per_token(tokenizer)
        assert bound is not None
        assert len(tokenizer.encode(text, add_special_tokens=False)) >= math.ceil(len(text) / bound)
