"""Issue 14's proof: a real `pagedd serve` on stories260K takes 100+ bad requests (malformed JSON, wrong
types, numbers out of range and beyond 64 bits, huge and deep bodies, megabyte prompts, bad token ids,
bad roles, bad n and choices, bad stop lists, half-sent requests) while streams run, and

- every bad request gets a 4xx in OpenAI's error shape, of the status its kind calls for
  (400, 404 unknown model or path, 405, 408 a body that never arrives, 413 too large a body);
- every stream in flight finishes whole: all its tokens, finish_reason "length", no error event;
- the server still serves, logged no internal error and lost no worker, and every KV block is
  released (paged_kv_blocks_used back to 0).

Hostile but valid input (jinja in message content) is answered normally and rendered as plain text.
One server for the module; the bad requests go out concurrently.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from paged.gateway.api.chat_template import ChatTemplate
from paged.shared.tokenizer import load_tokenizer
from support.daemon_process import Daemon, scrape, serve_stories

pytestmark = pytest.mark.slow

MODEL = "stories260K"
STREAM_TOKENS = 300
STREAM_LANES = 3
BODY_TIMEOUT_S = 2.0
WAIT_S = 120.0  # generous bounds on waiting for the server at all; nothing asserts on how fast it is
BIG = (1 << 64, 1 << 63, -(1 << 63) - 1, 10**40, -(10**40))
CHAT_OK: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Bad:
    name: str
    path: str
    body: bytes | dict[str, Any] | None
    status: int
    method: str = "POST"


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, **CHAT_OK, **fields}


def bad_inputs() -> list[Bad]:
    cases: list[Bad] = []

    def add(name: str, body: bytes | dict[str, Any] | None, status: int = 400, path: str = COMPLETION, **kw: Any) -> None:
        cases.append(Bad(name, path, body, status, **kw))

    # Malformed JSON.
    for i, raw in enumerate([b"", b"{", b"}", b"null", b"[]", b"123", b'"prompt"', b"{'prompt': 'x'}", b'{"prompt": "x",}',
                             b'{"prompt": NaN}', b'{"prompt": "x"} trailing', b"\xff\xfe{}", b'{"prompt": "\\ud800"', b"{" * 3]):
        add(f"malformed json {i}", raw, path=(COMPLETION, CHAT)[i % 2])
    # Wrong types.
    for name, value in [("prompt", 1), ("prompt", {}), ("prompt", True), ("prompt", [[["x"]]]), ("prompt", [1.5]),
                        ("prompt", [1, "a"]), ("max_tokens", "10"), ("max_tokens", 1.5), ("temperature", "hot"),
                        ("n", 1.5), ("stream", "yes"), ("stop", 5), ("stop", [1]), ("stop", {"a": 1}), ("stop_token_ids", "1"),
                        ("seed", 1.5), ("logprobs", True), ("stream_options", "x"), ("cache_salt", 5), ("priority", "high"),
                        ("user", 5), ("ignore_eos", "no"), ("top_k", [])]:
        add(f"wrong type {name}={value!r}", completion(**{name: value}))
    for name, value in [("messages", "hi"), ("messages", [{}]), ("messages", [{"role": "user", "content": 5}]),
                        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                        ("messages", [{"role": "user", "content": [{"text": "no type"}]}]), ("logprobs", "yes"),
                        ("top_logprobs", "1"), ("max_completion_tokens", [])]:
        add(f"wrong chat type {name}", chat(**{name: value}), path=CHAT)
    # Integers beyond what the wire carries (the OverflowError), and every other out-of-range number.
    for value in BIG:
        for name in ("seed", "top_k", "n", "max_tokens", "logprobs", "priority"):
            add(f"{name}={value}", completion(**{name: value}))
        add(f"stop_token_ids entry {value}", completion(stop_token_ids=[2, value]))
        add(f"prompt token id {value}", completion(prompt=[1, value]))
        add(f"chat seed {value}", chat(seed=value), path=CHAT)
    for name, value in [("temperature", -1), ("temperature", 1e400), ("top_p", 0), ("top_p", 1.5), ("min_p", 2),
                        ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0), ("top_k", -2),
                        ("n", 0), ("n", 17), ("n", -1), ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**6),
                        ("logprobs", 21), ("logprobs", -1)]:
        add(f"out of range {name}={value}", completion(**{name: value}))
    add("top_logprobs 21", chat(logprobs=True, top_logprobs=21), path=CHAT)
    add("max_completion_tokens 0", chat(max_completion_tokens=0), path=CHAT)
    # Bad token ids and stop lists.
    for prompt in ([512], [-1], [[1, 99999]], [[1], []], [[]], []):
        add(f"bad token-id prompt {prompt}", completion(prompt=prompt))
    for stop in ([""], ["a", ""], [[]], [None]):
        add(f"bad stop {stop}", completion(stop=stop))
    for ids in ([512], [-5], [0, 1 << 40]):
        add(f"bad stop_token_ids {ids}", completion(stop_token_ids=ids))
    add("100k stop strings", completion(stop=["ab"] * 100_000))
    add("1M stop_token_ids", completion(stop_token_ids=[5] * 1_000_000))
    # Bad roles, and jinja that must not help them through.
    for role in ("root", "", "User", "function_call", "system\nuser"):
        add(f"bad role {role!r}", chat(messages=[{"role": role, "content": "{{ raise_exception('x') }}"}]), path=CHAT)
    add("no messages", chat(messages=[]), path=CHAT)
    add("missing messages", {"model": MODEL}, path=CHAT)
    add("missing prompt", {"model": MODEL})
    # Bad n and too many choices.
    add("4000 prompts x n=16", completion(prompt=["x"] * 4000, n=16))
    add("300 prompts", completion(prompt=["x"] * 300))
    add("300 token-id prompts", completion(prompt=[[5, 6]] * 300))
    add("chat n=17", chat(n=17), path=CHAT)
    # Extensions.
    add("empty cache_salt", completion(cache_salt=""))
    add("empty cache_salt chat", chat(cache_salt=""), path=CHAT)
    # Huge and deep bodies, megabyte prompts.
    deep = 150_000
    add("deep nesting in an ignored field", b'{"prompt": "x", "junk": ' + b"[" * deep + b"]" * deep + b"}")
    add("deep nesting in prompt", b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}")
    add("deep objects in a message", b'{"messages": [{"role": "user", "content": "x", "x": ' + b'{"a":' * deep + b"1" + b"}" * deep + b"}]}",
        path=CHAT)
    add("7.5 MB prompt", completion(prompt="Once upon a time " * (7_500_000 // 17), max_tokens=None))
    add("1 MB chat message", chat(messages=[{"role": "user", "content": "x" * 1_000_000}]), path=CHAT)
    add("1 MB stop string", completion(stop=["y" * 1_000_000], prompt="a" * 600))
    add("body over 8 MiB", completion(prompt="x" * (9 << 20)), 413)
    # Unknown model, path, method.
    add("unknown model", completion(model="gpt-9"), 404)
    add("unknown model chat", chat(model="gpt-9"), 404, path=CHAT)
    add("unknown path", completion(), 404, path="/v1/embeddings")
    add("unknown path get", None, 404, path="/v2/completions", method="GET")
    add("wrong method", None, 405, path=COMPLETION, method="GET")
    add("wrong method models", None, 405, path="/v1/models", method="POST")
    return cases


BAD_INPUTS = bad_inputs()


@pytest.fixture(scope="module")
def server(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from serve_stories(
        tmp_path_factory.mktemp("bad-inputs"), stories_dir, "--kv-cache-memory", "4MiB", "--body-timeout", str(BODY_TIMEOUT_S),
        "--header-timeout", str(BODY_TIMEOUT_S),
    )  # fmt: skip


class StreamLanes:
    """STREAM_LANES threads, each streaming one long completion after another until stopped; every
    stream must end whole."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.finished: list[tuple[float, float]] = []  # (start, end) of each whole stream
        self.threads = [threading.Thread(target=self._lane, args=(i,), daemon=True) for i in range(STREAM_LANES)]

    def __enter__(self) -> StreamLanes:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)

    def _lane(self, lane: int) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._one(f"Once upon a time, lane {lane} said")
            except Exception as error:  # noqa: BLE001 - any way a stream can break is a failure to report
                self.failures.append(f"lane {lane}: {type(error).__name__}: {error}")
                return
            self.finished.append((started, time.monotonic()))

    def _one(self, prompt: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
        tokens, finish = 0, None
        with httpx.stream("POST", f"{self.url}{COMPLETION}", json=body, timeout=WAIT_S) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                tokens += 1
                finish = event["choices"][0]["finish_reason"] or finish
        assert finish == "length" and tokens <= STREAM_TOKENS and tokens > 0, (tokens, finish)


def assert_openai_error(response: httpx.Response, case: Bad) -> None:
    assert response.status_code == case.status, (case.name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, (case.name, error)
    assert isinstance(error["message"], str) and error["message"], case.name
    assert error["type"] == {404: "not_found_error"}.get(case.status, "invalid_request_error"), (case.name, error)


async def send_all(url: str, cases: list[Bad]) -> list[httpx.Response]:
    limits = asyncio.Semaphore(8)

    async def send(client: httpx.AsyncClient, case: Bad) -> httpx.Response:
        async with limits:
            content = case.body if isinstance(case.body, bytes) or case.body is None else json.dumps(case.body).encode()
            return await client.request(case.method, case.path, content=content, headers={"content-type": "application/json"})

    async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        return await asyncio.gather(*(send(client, case) for case in cases))


def raw_requests(url: str) -> list[str]:
    """What a client cannot send through httpx: partial headers (cut off), a body shorter than its
    Content-Length (408), a Content-Length over the limit (413 before any of the body is read)."""
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answers = []
    for request in (head[:40], head + b'Content-Length: 500\r\n\r\n{"prompt"', head + b"Content-Length: %d\r\n\r\n{" % (64 << 20)):
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            answers.append(received.decode(errors="replace"))
    return answers


def test_bad_inputs_fail_alone(server: Daemon) -> None:
    assert len(BAD_INPUTS) >= 100
    with StreamLanes(server.url) as lanes:
        deadline = time.monotonic() + WAIT_S
        while len({t for t in lanes.threads if t.is_alive()}) < STREAM_LANES and time.monotonic() < deadline:
            time.sleep(0.05)
        barrage_started = time.monotonic()
        responses = asyncio.run(send_all(server.url, BAD_INPUTS))
        partial_headers, short_body, declared_too_large = raw_requests(server.url)
        barrage_ended = time.monotonic()
        while len(lanes.finished) < STREAM_LANES and not lanes.failures and time.monotonic() < deadline:
            time.sleep(0.05)  # at least one whole stream per lane, whatever the timing
    for case, response in zip(BAD_INPUTS, responses, strict=True):
        assert_openai_error(response, case)
    assert partial_headers == ""
    assert short_body.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in short_body
    assert declared_too_large.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in declared_too_large
    assert not lanes.failures, lanes.failures
    assert any(start < barrage_ended and end > barrage_started for start, end in lanes.finished), "no stream overlapped the bad requests"
    # Still serving, and nothing left behind.
    ok = httpx.post(f"{server.url}{COMPLETION}", json=completion(max_tokens=4), timeout=WAIT_S)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{server.url}/health", timeout=WAIT_S).status_code == 200
    deadline = time.monotonic() + WAIT_S
    while (used := scrape(server.url)["paged_kv_blocks_used{worker=0}"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert used == 0
    events = server.logs()
    assert not [e for e in events if e.get("event") in ("request.internal_error", "worker_lost", "step_loop_failed", "request_failed")]
    assert not [e for e in events if e.get("event") == "<not json>" and "Traceback" in e["line"]]


def test_jinja_in_content_is_text(server: Daemon, stories_dir: Path) -> None:
    """A template sandbox would refuse this; as content it is never a template at all, just characters."""
    tokenizer = load_tokenizer(stories_dir)
    hostile = "{{ 7*7 }}{% for x in range(10**9) %}x{% endfor %}{{ raise_exception('boom') }}"
    messages = [{"role": "user", "content": hostile}]
    response = httpx.post(f"{server.url}{CHAT}", json={"model": MODEL, "messages": messages, "max_tokens": 2}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    rendered = ChatTemplate(None, tokenizer.bos_token, tokenizer.eos_token).render(messages)
    assert hostile in rendered
    assert response.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
