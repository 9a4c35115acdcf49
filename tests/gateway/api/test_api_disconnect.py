"""A client that goes away aborts its request in the engine, streaming or not."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from support.api_fixtures import base_url, client, engine, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine


async def wait_until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_closed_mid_way_aborts(base_url: str, engine: FakeEngine, path: str) -> None:
    engine.step_delay_s = 0.02
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "stream": True}
    async with httpx.AsyncClient(base_url=base_url) as client:
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    break
    await wait_until(lambda: engine.aborted == [engine.submitted[0].request_id])
    assert engine.live == set() and engine.completed == []


async def test_non_streaming_client_gone_aborts(base_url: str, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.02
    async with httpx.AsyncClient(base_url=base_url) as client:
        request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 400}))
        await wait_until(lambda: len(engine.live) == 1)
        request.cancel()  # closes the connection
        await asyncio.gather(request, return_exceptions=True)
    await wait_until(lambda: engine.aborted == [engine.submitted[0].request_id])
    assert engine.live == set()


async def test_client_gone_before_first_token(base_url: str, engine: FakeEngine) -> None:
    engine.step_delay_s = 5.0  # still "prefilling" when the client leaves
    async with httpx.AsyncClient(base_url=base_url) as client:
        request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "stream": True}))
        await wait_until(lambda: len(engine.live) == 1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await wait_until(lambda: len(engine.aborted) == 1)
    assert engine.live == set()


async def test_n_and_prompts_all_aborted(base_url: str, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.02
    async with httpx.AsyncClient(base_url=base_url) as client:
        body = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 400, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
    await wait_until(lambda: len(engine.aborted) == 3)
    assert engine.live == set()
