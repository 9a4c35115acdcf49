"""A checkpoint's generation_config.json sampling defaults fill what a request leaves out, as in
transformers and vLLM: a value the request sets wins, then the checkpoint's, then ours."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.shared.sampling_params import GenerationDefaults
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, engine, story_ids, tokenizer  # noqa: F401  # fixtures
from support.api_server import serving
from support.fake_engine import FakeEngine

CHECKPOINT = GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, max_tokens=7)


@pytest.fixture
async def client(engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    async with serving(build_app(engine, tokenizer, MODEL, generation_defaults=CHECKPOINT)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield http


async def test_checkpoint_defaults_fill_what_the_request_leaves_out(client: httpx.AsyncClient, engine: FakeEngine) -> None:  # noqa: F811
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "top_p": 0.5})
    assert response.status_code == 200, response.text
    params = engine.submitted[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.5, 20, 1.1)
    assert params.min_p == 0.0  # the checkpoint sets none: ours
    assert params.max_tokens == 7  # max_new_tokens, within the room the prompt leaves


async def test_chat_takes_the_same_defaults_and_request_values_win(client: httpx.AsyncClient, engine: FakeEngine) -> None:  # noqa: F811
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "max_tokens": 3}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    params = engine.submitted[-1].params
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 20, 3)
