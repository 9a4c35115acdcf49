"""Inputs an attacker (or a careless client) sends: numbers the wire cannot carry, bodies nested too
deeply to decode, an empty cache salt, more choices than one request may ask for, unknown chat roles.
Each is a 400 naming the field, and nothing reaches the engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.shared.config import HttpConfig
from paged.shared.protocol import WIRE_INT_MAX, WIRE_INT_MIN
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, client, engine, story_ids, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "Hello"}]}
TOO_BIG = (1 << 64, 1 << 63, WIRE_INT_MIN - 1, -(1 << 64), 10**40)


def assert_400(response: httpx.Response, param: str, contains: str = "") -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert contains in error["message"], error
    return error


@pytest.mark.parametrize("value", TOO_BIG)
@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"seed": "V"}, "seed"),
        ("/v1/completions", {"top_k": "V"}, "top_k"),
        ("/v1/completions", {"n": "V"}, "n"),
        ("/v1/completions", {"max_tokens": "V"}, "max_tokens"),
        ("/v1/completions", {"logprobs": "V"}, "logprobs"),
        ("/v1/completions", {"priority": "V"}, "priority"),
        ("/v1/completions", {"stop_token_ids": [2, "V"]}, "stop_token_ids[1]"),
        ("/v1/completions", {"prompt": [1, "V"]}, "prompt[1]"),
        ("/v1/completions", {"prompt": [[1], [5, "V"]]}, "prompt[1][1]"),
        ("/v1/chat/completions", {"seed": "V"}, "seed"),
        ("/v1/chat/completions", {"max_completion_tokens": "V"}, "max_completion_tokens"),
        ("/v1/chat/completions", {"top_logprobs": "V", "logprobs": True}, "top_logprobs"),
    ],
)
async def test_integers_the_wire_cannot_carry(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, fields: dict[str, Any], param: str, value: int
) -> None:
    def put(item: Any) -> Any:
        if item == "V":
            return value
        return [put(x) for x in item] if isinstance(item, list) else item

    base = {"prompt": "x"} if path == "/v1/completions" else CHAT
    assert_400(await client.post(path, json={**base, **{k: put(v) for k, v in fields.items()}}), param)
    assert engine.submitted == []


async def test_integers_at_the_wire_limits_pass(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    for seed in (WIRE_INT_MIN, WIRE_INT_MAX):
        response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "seed": seed, "top_k": WIRE_INT_MAX})
        assert response.status_code == 200, response.text
    assert [s.params.seed for s in engine.submitted] == [WIRE_INT_MIN, WIRE_INT_MAX]
    assert engine.submitted[0].params.top_k == WIRE_INT_MAX


async def test_stop_token_ids_inside_the_vocabulary(client: httpx.AsyncClient, tokenizer: Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    assert_400(await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [2, vocab]}), "stop_token_ids[1]", str(vocab - 1))
    assert_400(await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [-1]}), "stop_token_ids[0]")
    ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stop_token_ids": [0, vocab - 1]})
    assert ok.status_code == 200


@pytest.mark.parametrize("where", ["ignored field", "prompt", "messages"])
async def test_deeply_nested_json(client: httpx.AsyncClient, engine: FakeEngine, where: str) -> None:
    depth = 200_000
    deep = b"[" * depth + b"]" * depth
    body = {
        "ignored field": b'{"prompt": "x", "extra": ' + deep + b"}",
        "prompt": b'{"prompt": ' + deep + b"}",
        "messages": b'{"messages": [{"role": "user", "content": "x", "extra": ' + deep + b"}]}",
    }[where]
    path = "/v1/chat/completions" if where == "messages" else "/v1/completions"
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert engine.submitted == []


async def test_empty_cache_salt_is_refused(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", CHAT)):
        assert_400(await client.post(path, json={**base, "cache_salt": ""}), "cache_salt", "non-empty")
    ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "cache_salt": "tenant-a"})
    assert ok.status_code == 200
    unsalted = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "cache_salt": None})
    assert unsalted.status_code == 200
    assert [s.cache_salt for s in engine.submitted] == ["tenant-a", None]


async def test_total_choices_are_bounded(engine: FakeEngine, tokenizer: Tokenizer) -> None:
    app = build_app(engine, tokenizer, MODEL, http=HttpConfig(max_request_choices=32))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        error = assert_400(await client.post("/v1/completions", json={"prompt": ["x"] * 4, "n": 16}), "n", "64 choices")
        assert "32" in error["message"]
        assert_400(await client.post("/v1/completions", json={"prompt": [[5]] * 33}), "prompt", "33 choices")
        assert engine.submitted == []
        ok = await client.post("/v1/completions", json={"prompt": ["x"] * 2, "n": 16, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 32


async def test_default_choice_limit(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """The issue's 4000 prompts x n=16 (64,000 choices) is refused before any prompt is tokenized."""
    assert_400(await client.post("/v1/completions", json={"prompt": ["x"] * 4000, "n": 16}), "n", "64000 choices")
    assert engine.submitted == []


@pytest.mark.parametrize("role", ["root", "", "User", "function_call", "system\nUser"])
async def test_unknown_chat_roles(client: httpx.AsyncClient, engine: FakeEngine, role: str) -> None:
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": role, "content": "x"}]}
    assert_400(await client.post("/v1/chat/completions", json=body), "messages[1].role")
    assert engine.submitted == []


async def test_every_openai_role_is_accepted(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ]
    response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text


async def test_an_unexpected_failure_is_a_500_in_openai_shape(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    def explode() -> bool:
        raise RuntimeError("boom")

    engine.is_ready = explode  # type: ignore[method-assign]
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "boom" not in response.text  # internals stay in the log


async def test_stop_lists_are_bounded(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Each generated token is matched against every stop string on the event loop: a list of a million
    would stall the server, so both lists are capped."""
    assert_400(await client.post("/v1/completions", json={"prompt": "x", "stop": ["ab"] * 100_000}), "stop", "at most 16")
    assert_400(await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [5] * 1_000_000}), "stop_token_ids", "at most 256")
    assert engine.submitted == []
    ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stop": ["a"] * 16, "stop_token_ids": [5] * 256})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids[0]"),
    ],
)
async def test_out_of_range_values_have_code_invalid_value(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    """docs/http-api.md: a value of the right type but out of range is `code: invalid_value`, as msgspec's
    own range checks (the wire's integer limits) already are."""
    assert assert_400(await client.post("/v1/completions", json={"prompt": "x", **fields}), param)["code"] == "invalid_value"
    assert engine.submitted == []


async def test_echo_is_refused_rather_than_ignored(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """A scoring client that sends echo would read a completion without its prompt as the answer."""
    error = assert_400(await client.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1}), "echo")
    assert error["code"] == "invalid_value" and "not supported" in error["message"]
    assert engine.submitted == []
    assert (await client.post("/v1/completions", json={"prompt": "x", "echo": False, "max_tokens": 2})).status_code == 200
