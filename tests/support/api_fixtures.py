"""Fixtures of the HTTP API tests (imported by the tests/gateway/api/ modules that use them)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.shared.tokenizer import Tokenizer, load_tokenizer
from support.api_server import serving
from support.fake_engine import FakeEngine, cycling_script

MODEL = "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside."


@pytest.fixture
def tokenizer(stories_dir: Path) -> Tokenizer:
    return load_tokenizer(stories_dir)


@pytest.fixture
def story_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(STORY, add_special_tokens=False)


@pytest.fixture
def engine(story_ids: list[int]) -> FakeEngine:
    return FakeEngine(cycling_script(story_ids))


@pytest.fixture
async def base_url(engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[str]:
    async with serving(build_app(engine, tokenizer, MODEL)) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c


async def sse_payloads(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    """POST a streaming request; the decoded `data:` payloads, with "[DONE]" kept as a string."""
    payloads: list[Any] = []
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    for event in raw.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def expected_text(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    """What the generated tokens add to the prompt's text."""
    return tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]
