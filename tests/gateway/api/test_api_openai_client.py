"""The official openai client against the API (fake engine behind it), unchanged but for base_url."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from paged.gateway.api.app import build_app
from paged.gateway.engine_client import AdmissionError, Refusal
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, engine, story_ids, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine


@pytest.fixture
async def oai(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_completions(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=8, logprobs=1)
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None and whole.usage.completion_tokens == 8
    assert whole.choices[0].logprobs is not None and len(whole.choices[0].logprobs.tokens or []) == 8
    stream = await oai.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens


async def test_chat(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, n=2, extra_body={"top_k": 5})  # type: ignore[arg-type]
    assert [c.index for c in whole.choices] == [0, 1] and whole.choices[0].message.role == "assistant"
    stream = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)  # type: ignore[arg-type]
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    assert text == whole.choices[0].message.content
    models = await oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_errors_map_to_client_exceptions(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert bad.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="nope", prompt="x")
    engine.refusal = AdmissionError(Refusal.QUEUE_FULL, "queue full", retry_after=1)
    with pytest.raises(openai.RateLimitError):
        await oai.completions.create(model=MODEL, prompt="x")
    engine.refusal = None
    engine.fail_after_steps = 2
    stream = await oai.completions.create(model=MODEL, prompt="x", max_tokens=10, stream=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        async for _ in stream:
            pass


async def test_api_key(engine: FakeEngine, tokenizer: Tokenizer) -> None:
    async with serving(build_app(engine, tokenizer, MODEL, api_key="k1")) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0) as client:
            assert (await client.completions.create(model=MODEL, prompt="x", max_tokens=2)).choices[0].text
