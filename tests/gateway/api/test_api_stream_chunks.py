"""Streams carry no empty chunks: a token that adds no text yet (part of a UTF-8 character, or text held
back as the possible start of a stop string) sends nothing, as in vLLM; its text comes with a later chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, sse_payloads, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine, cycling_script

TEXT = "a ✓ b ✓✓ c"  # "✓" is three byte-fallback tokens in stories260K: two of them add no text alone


@pytest.fixture
async def client(tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    engine = FakeEngine(cycling_script(tokenizer.encode(TEXT, add_special_tokens=False)))
    async with serving(build_app(engine, tokenizer, MODEL)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


def _choices(payloads: list[Any]) -> list[dict[str, Any]]:
    return [choice for p in payloads if p != "[DONE]" for choice in p["choices"]]


async def test_completion_stream_has_no_empty_chunk(client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "max_tokens": 14, "n": 2}
    choices = _choices(await sse_payloads(client, "/v1/completions", body))
    assert all(c["text"] or c["finish_reason"] for c in choices), choices
    for index in (0, 1):
        assert "✓" in "".join(c["text"] for c in choices if c["index"] == index)


async def test_chat_stream_has_no_empty_delta(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 14, "stop": ["b ✓"]}
    choices = _choices(await sse_payloads(client, "/v1/chat/completions", body))
    first, *rest = choices
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert all(c["delta"].get("content") or c["finish_reason"] for c in rest), rest
    assert "".join(c["delta"].get("content", "") for c in rest) == " a ✓ " and rest[-1]["finish_reason"] == "stop"


async def test_logprobs_of_textless_tokens_still_stream(client: httpx.AsyncClient) -> None:
    """With logprobs asked for, a chunk of a textless token carries its logprob, so none is lost."""
    body = {"prompt": "x", "max_tokens": 6, "logprobs": 0}
    choices = _choices(await sse_payloads(client, "/v1/completions", body))
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 6
