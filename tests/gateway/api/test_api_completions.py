"""POST /v1/completions against the fake engine, streamed and not."""

from __future__ import annotations

import httpx

from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, client, engine, expected_text, sse_payloads, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine


async def test_completion_text_prompt(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer, story_ids: list[int]) -> None:
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    prompt = tokenizer.encode("Hello")
    assert engine.submitted[0].prompt_token_ids == prompt and prompt[0] == tokenizer.bos_token_id
    assert engine.submitted[0].params.max_tokens == 5 and engine.submitted[0].params.temperature == 0
    assert engine.submitted[0].eos_token_ids == tokenizer.eos_token_ids
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": expected_text(tokenizer, prompt, story_ids[:5]), "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 5, "total_tokens": len(prompt) + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_completion_streamed_equals_whole(client: httpx.AsyncClient, tokenizer: Tokenizer, story_ids: list[int]) -> None:
    request = {"model": MODEL, "prompt": "Hello", "max_tokens": 12}
    whole = (await client.post("/v1/completions", json=request)).json()
    payloads = await sse_payloads(client, "/v1/completions", request)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


async def test_token_id_prompts_used_as_is(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/completions", json={"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "n": 2})
    body = response.json()
    assert response.status_code == 200, body
    assert [s.prompt_token_ids for s in engine.submitted] == [[5, 6, 7], [8, 9]]  # no BOS added
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] != body["choices"][1]["text"]  # the fake's two sequences differ
    assert body["choices"][0]["text"] == body["choices"][2]["text"]  # same script for both prompts
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 12
    single = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert single.status_code == 200 and engine.submitted[-1].prompt_token_ids == [5, 6, 7]


async def test_list_of_strings(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer) -> None:
    body = (await client.post("/v1/completions", json={"prompt": ["One", "Two"], "max_tokens": 2})).json()
    assert [s.prompt_token_ids for s in engine.submitted] == [tokenizer.encode("One"), tokenizer.encode("Two")]
    assert len({s.request_id for s in engine.submitted}) == 2
    assert [c["index"] for c in body["choices"]] == [0, 1]


async def test_max_tokens_defaults_to_rest_of_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/completions", json={"prompt": [1, 2, 3, 4]})
    assert engine.submitted[0].params.max_tokens == engine.max_model_len - 4


async def test_sampling_fields_reach_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    request = {
        "prompt": "x", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "stop_token_ids": [9],
        "ignore_eos": True, "priority": -3, "cache_salt": "tenant-a", "user": "u", "unknown_field": {"x": 1},
    }
    assert (await client.post("/v1/completions", json=request)).status_code == 200
    sub = engine.submitted[0]
    p = sub.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.7, 0.9, 40, 0.05, 7)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.stop_token_ids == (9,) and p.ignore_eos and p.logprobs is None
    assert sub.priority == -3 and sub.cache_salt == "tenant-a"


async def test_stop_string_truncates_and_aborts(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer, story_ids: list[int]) -> None:
    prompt = tokenizer.encode("Hello")
    full = expected_text(tokenizer, prompt, story_ids)
    stop = "little girl"
    response = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 40, "stop": stop})
    choice = response.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    assert engine.aborted == [engine.submitted[0].request_id]  # the engine stopped generating
    payloads = await sse_payloads(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 40, "stop": [stop, "zzz"]})
    texts = [p["choices"][0]["text"] for p in payloads[:-1]]
    assert "".join(texts) == full[: full.index(stop)]
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"


async def test_logprobs_completion_shape(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "logprobs": 2})).json()
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert all(len(alts) == 2 for alts in logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0


async def test_include_usage_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.cached_tokens = 2
    payloads = await sse_payloads(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = payloads
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


async def test_stop_string_per_choice(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer, story_ids: list[int]) -> None:
    """With n=2, a choice that hits a stop string ends there while its sibling runs on."""
    prompt = tokenizer.encode("Hello")
    first = expected_text(tokenizer, prompt, story_ids[:30])
    second = expected_text(tokenizer, prompt, story_ids[1:31])
    stop = "Lily"
    assert stop in first and stop not in second[:20]
    body = (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 30, "n": 2, "stop": stop})).json()
    choices = body["choices"]
    assert choices[0]["text"] == first[: first.index(stop)] and choices[0]["finish_reason"] == "stop"
    expected_second = second[: second.index(stop)] if stop in second else second
    assert choices[1]["text"] == expected_second
    assert choices[1]["finish_reason"] == ("stop" if stop in second else "length")


async def test_logprobs_text_offsets_count_held_back_text(client: httpx.AsyncClient) -> None:
    """Text held back as the possible start of a stop string still has its offsets: each token's
    offset is where its text starts in the choice's text, whatever the chunks were."""
    request = {"prompt": "Hello", "max_tokens": 16, "logprobs": 1, "stop": "little girl named Bob"}
    body = (await client.post("/v1/completions", json=request)).json()
    logprobs = body["choices"][0]["logprobs"]
    tokens = logprobs["tokens"]
    assert "".join(tokens) == body["choices"][0]["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    payloads = await sse_payloads(client, "/v1/completions", request)
    streamed = [p["choices"][0]["logprobs"] for p in payloads[:-1]]
    assert [o for s in streamed for o in s["text_offset"]] == logprobs["text_offset"]
