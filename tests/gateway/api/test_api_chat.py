"""POST /v1/chat/completions against the fake engine, streamed and not."""

from __future__ import annotations

import httpx

from paged.gateway.api.chat_template import ChatTemplate
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, client, engine, expected_text, sse_payloads, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine

MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me one."}]


def chat_prompt(tokenizer: Tokenizer) -> list[int]:
    text = ChatTemplate(None, tokenizer.bos_token, tokenizer.eos_token).render(MESSAGES)
    return tokenizer.encode(text, add_special_tokens=False)


async def test_chat_completion(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer, story_ids: list[int]) -> None:
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 6})
    body = response.json()
    assert response.status_code == 200, body
    prompt = chat_prompt(tokenizer)
    assert engine.submitted[0].prompt_token_ids == prompt
    assert prompt[0] == tokenizer.bos_token_id and prompt[1] != tokenizer.bos_token_id  # BOS once, from the template
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{
        "index": 0,
        "message": {"role": "assistant", "content": expected_text(tokenizer, prompt, story_ids[:6])},
        "logprobs": None,
        "finish_reason": "length",
    }]
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 6


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    request = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 8, "n": 2}
    whole = (await client.post("/v1/chat/completions", json=request)).json()
    payloads = await sse_payloads(client, "/v1/chat/completions", {**request, "stream_options": {"include_usage": True}})
    *chunks, usage, done = payloads
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"], chunks[0]["id"]}) == 1 for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == whole["choices"][index]["message"]["content"]
        assert mine[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in mine[:-1])


async def test_chat_content_parts_and_logprobs(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell"}, {"type": "text", "text": "me one."}]}]
    body = (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})).json()
    assert "User: Tell\nme one.\n" in tokenizer.decode(engine.submitted[0].prompt_token_ids)
    assert engine.submitted[0].params.logprobs == 2
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(content[0]["top_logprobs"]) == 2
    assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == body["choices"][0]["message"]["content"]


async def test_chat_stop_string(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 30, "stop": ["girl"]})).json()
    assert body["choices"][0]["message"]["content"].endswith("little ") and body["choices"][0]["finish_reason"] == "stop"
    assert engine.aborted == [engine.submitted[0].request_id]
