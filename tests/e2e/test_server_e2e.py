"""End to end: a real `pagedd serve` process with stories260K on a free loopback port, driven
through httpx and the openai client (issue 5's proof)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from paged.shared.tokenizer import Tokenizer, load_tokenizer
from support.daemon_process import Daemon, parse_metrics, scrape, serve_stories

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park",
    "The little dog",
    "One day, a big bird",
    "Tom had a red ball. He",
    "She was sad because",
    "The sun was shining and",
    "Mom said",
]


@pytest.fixture(scope="module")
def server(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from serve_stories(tmp_path_factory.mktemp("e2e"), stories_dir)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    return load_tokenizer(stories_dir)


def completion(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_matches_transformers(server: Daemon, stories_dir: Path, tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(stories_dir), torch_dtype=torch.float32).eval()
    for prompt, max_tokens in zip(PROMPTS[:4], (8, 16, 24, 32), strict=True):
        prompt_ids = tokenizer.encode(prompt)
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=sorted(tokenizer.eos_token_ids), pad_token_id=0,
            )
        generated = output[0, len(prompt_ids):].tolist()
        expected = tokenizer.decode(prompt_ids + generated)[len(tokenizer.decode(prompt_ids)):]
        body = completion(server.url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert body["choices"][0]["text"] == expected, prompt
        by_ids = completion(server.url, {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0})
        assert by_ids["choices"][0]["text"] == expected


def test_both_endpoints_httpx_and_openai(server: Daemon) -> None:
    request = {"model": "stories260K", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    whole = completion(server.url, request)
    streamed = ""
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**request, "stream": True}, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        streamed += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
    assert streamed == whole["choices"][0]["text"]

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.completions.create(model="stories260K", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert result.choices[0].text == whole["choices"][0]["text"]
    stream = client.completions.create(model="stories260K", prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole["choices"][0]["text"]
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens <= 16
    chat_stream = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=16, temperature=0, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["stories260K"]


async def test_64_concurrent_streams_equal_alone(server: Daemon) -> None:
    """Mixed lengths, greedy and seeded sampling: each of 64 concurrent streams equals the same
    request sent alone (batching must not change any request's output)."""
    distinct = [
        {"prompt": prompt, "max_tokens": max_tokens, **sampling}
        for prompt, max_tokens in zip(PROMPTS, (4, 9, 17, 30, 6, 24, 12, 40), strict=True)
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 1234})
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:

        async def stream(body: dict[str, Any]) -> str:
            text = ""
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
            return text

        alone = [await stream(body) for body in distinct]
        together = await asyncio.gather(*(stream(distinct[i % len(distinct)]) for i in range(64)))
    assert all(t for t in alone)
    for i, text in enumerate(together):
        assert text == alone[i % len(distinct)], distinct[i % len(distinct)]


def test_closed_stream_frees_its_blocks(server: Daemon) -> None:
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()  # kept referenced: dropping the iterator closes the connection
        events = [line for line in (next(lines) for _ in range(6)) if line]
        assert len(events) == 3
        assert scrape(server.url)["paged_kv_blocks_used{worker=0}"] > 0
    # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while True:
        metrics = scrape(server.url)
        if metrics["paged_kv_blocks_used{worker=0}"] == 0 and metrics["paged_requests_running{worker=0}"] == 0:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    assert metrics["paged_requests_finished_total{reason=abort}"] >= 1


def test_metrics_exact_names(server: Daemon) -> None:
    completion(server.url, {"prompt": PROMPTS[2], "max_tokens": 4})
    names = set(scrape(server.url))
    for name in (
        "paged_requests_running", "paged_requests_waiting", "paged_kv_blocks_total", "paged_kv_blocks_used",
        "paged_kv_blocks_free", "paged_kv_blocks_cached", "paged_kv_utilization",
        "paged_prefix_cache_queries_tokens_total", "paged_prefix_cache_hits_tokens_total", "paged_preemptions_total",
    ):
        assert f"{name}{{worker=0}}" in names, name
    for name in ("paged_prompt_tokens_total", "paged_generation_tokens_total", "paged_time_to_first_token_seconds_count",
                 "paged_time_per_output_token_seconds_count", "paged_e2e_request_latency_seconds_count",
                 "paged_request_queue_time_seconds_count"):
        assert name in names, name


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_errors(server: Daemon) -> None:
    url = f"{server.url}/v1/completions"
    assert error_of(httpx.post(url, json={"prompt": "x", "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(httpx.post(url, json={"prompt": "x", "max_tokens": 0}), 400)["param"] == "max_tokens"
    assert error_of(httpx.post(url, json={"prompt": "x", "n": 1000}), 400)["param"] == "n"
    assert error_of(httpx.post(url, json={"prompt": "x", "top_k": "many"}), 400)["param"] == "top_k"
    message = error_of(httpx.post(url, json={"prompt": [5] * 600}), 400)["message"]
    assert "512" in message and "600" in message
    error_of(httpx.post(url, json={"model": "gpt-9", "prompt": "x"}), 404)
    error_of(httpx.get(f"{server.url}/v2/anything"), 404)
    error_of(httpx.post(url, content=b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'), 413)


@pytest.fixture(scope="module")
def guarded_server(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """--api-key, and caps small enough to refuse a burst: one running sequence, one waiting."""
    yield from serve_stories(tmp_path_factory.mktemp("e2e-guarded"), stories_dir, "--api-key", "e2e-key", "--max-num-seqs", "1", "--max-waiting-requests", "1")


async def test_api_key_and_admission_caps(guarded_server: Daemon) -> None:
    url = guarded_server.url
    error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}), 401)
    error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(f"{url}/health").status_code == 200
    headers = {"Authorization": "Bearer e2e-key"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        body = {"prompt": PROMPTS[0], "max_tokens": 40, "ignore_eos": True}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 2, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert error_of(refused, 429)["type"] == "rate_limit_error"
