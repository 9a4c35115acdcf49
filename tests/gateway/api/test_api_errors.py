"""Every error the API sends: status, OpenAI error body, and headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.gateway.engine_client import AdmissionError, Refusal
from paged.shared.config import HttpConfig
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, client, engine, sse_payloads, story_ids, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine


def assert_error(response: httpx.Response, status: int, param: str | None = None, *, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert contains in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("fields", "param", "contains"),
    [
        ({"temperature": -0.5}, "temperature", "-0.5"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"n": 0}, "n", "between 1 and 16"),
        ({"n": 17}, "n", "between 1 and 16"),
        ({"top_p": 0}, "top_p", ""),
        ({"logprobs": 21}, "logprobs", ""),
        ({"stop": [""]}, "stop", ""),
        ({"temperature": "hot"}, "temperature", "Expected `float | null`"),
        ({"max_tokens": 1.5}, "max_tokens", ""),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", ""),
        ({"prompt": [1, "a"]}, "prompt", "not a mix"),
        ({"prompt": [600]}, "prompt", "outside the vocabulary"),
        ({"prompt": []}, "prompt", "empty"),
    ],
)
async def test_completion_400(client: httpx.AsyncClient, fields: dict[str, Any], param: str, contains: str) -> None:
    error = assert_error(await client.post("/v1/completions", json={"prompt": "hi", **fields}), 400, param, contains=contains)
    assert error["type"] == "invalid_request_error"


async def test_missing_field_and_bad_json(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_error(await client.post("/v1/chat/completions", json={"messages": [{"content": "x"}]}), 400, "messages[0].role")
    assert_error(await client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    chat = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}
    assert_error(await client.post("/v1/chat/completions", json=chat), 400, "top_logprobs")
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert_error(await client.post("/v1/chat/completions", json=chat), 400, "messages[0].content")
    assert_error(await client.post("/v1/completions", content=b"{not json"), 400, None, contains="not valid JSON")


async def test_prompt_longer_than_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    long_prompt = [5] * (engine.max_model_len + 3)
    error = assert_error(await client.post("/v1/completions", json={"prompt": long_prompt}), 400, "prompt")
    assert f"{engine.max_model_len} tokens" in error["message"] and f"{len(long_prompt)} tokens" in error["message"]
    error = assert_error(await client.post("/v1/completions", json={"prompt": [5] * 500, "max_tokens": 100}), 400, "max_tokens")
    assert all(str(x) in error["message"] for x in (512, 500, 100, 600))
    assert engine.submitted == []


async def test_unknown_model_and_path(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model", contains="gpt-9")
    assert error["code"] == "model_not_found"
    assert_error(await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "model")
    assert_error(await client.get("/v1/nothing"), 404, contains="/v1/nothing")
    assert_error(await client.get("/v1/completions"), 405)


async def test_body_too_large(engine: FakeEngine, tokenizer: Tokenizer) -> None:
    async with serving(build_app(engine, tokenizer, MODEL, http=HttpConfig(max_body_size=1000))) as url, httpx.AsyncClient(base_url=url) as client:
        assert_error(await client.post("/v1/completions", json={"prompt": "x" * 2000}), 413)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming in
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        assert_error(await client.post("/v1/completions", content=chunked()), 413)
        assert (await client.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})).status_code == 200


async def test_api_key(engine: FakeEngine, tokenizer: Tokenizer) -> None:
    async with serving(build_app(engine, tokenizer, MODEL, api_key="sekrit")) as url, httpx.AsyncClient(base_url=url) as client:
        request = {"prompt": "x", "max_tokens": 1}
        error = assert_error(await client.post("/v1/completions", json=request), 401)
        assert error["type"] == "authentication_error"
        assert_error(await client.post("/v1/completions", json=request, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(await client.get("/v1/models"), 401)
        ok = await client.post("/v1/completions", json=request, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200  # probes need no key
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_admission_refused(client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    engine.refusal = AdmissionError(Refusal.QUEUE_FULL, "too many requests waiting", retry_after=2.5)
    response = await client.post("/v1/completions", json={"prompt": "x", "stream": stream})
    error = assert_error(response, 429, contains="too many")
    assert response.headers["retry-after"] == "3" and error["type"] == "rate_limit_error"
    engine.refusal = AdmissionError(Refusal.UNAVAILABLE, "draining")
    assert_error(await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": stream}), 503)


async def test_not_ready_or_draining(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.ready = False
    assert (await client.get("/health")).json() == {"status": "starting"}
    assert (await client.get("/health")).status_code == 503
    response = await client.post("/v1/completions", json={"prompt": "x"})
    assert_error(response, 503, contains="no worker")
    assert response.headers["retry-after"] == "1"
    engine.ready, engine.draining = True, True
    health = await client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503, contains="draining")
    engine.draining = False
    assert (await client.get("/health")).status_code == 200
    assert engine.submitted == []


@pytest.mark.parametrize("knob", ["fail_after_steps", "raise_after_steps"])
async def test_failure_mid_stream(client: httpx.AsyncClient, engine: FakeEngine, knob: str) -> None:
    setattr(engine, knob, 3)
    payloads = await sse_payloads(client, "/v1/completions", {"prompt": "x", "max_tokens": 10})
    *chunks, error, done = payloads
    assert len(chunks) == 3 and all("choices" in c for c in chunks)
    assert done == "[DONE]" and set(error) == {"error"} and error["error"]["type"] == "server_error"
    response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10})
    assert_error(response, 500, contains="generation failed")
