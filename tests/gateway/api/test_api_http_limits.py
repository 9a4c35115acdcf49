"""Clients that hold connections without finishing a request: partial headers, a body shorter than its
Content-Length, more connections than the cap (gateway/api/http_protocol.py, request_body.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from paged.gateway.api.app import build_app
from paged.shared.config import HttpConfig
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, engine, story_ids, tokenizer  # noqa: F401
from support.api_server import serving
from support.fake_engine import FakeEngine

LIMITS = HttpConfig(header_timeout=0.5, body_timeout=0.5, max_connections=3)
CLOSE_WITHIN_S = 20.0  # a bound on waiting for the server to act at all, far above the 0.5 s timeouts


@pytest.fixture
async def url(engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[str]:
    async with serving(build_app(engine, tokenizer, MODEL, http=LIMITS), LIMITS) as url:
        yield url


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), CLOSE_WITHIN_S)  # read() returns once the server closes


def response_of(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


async def test_partial_headers_are_cut_off(url: str) -> None:
    async with raw(url) as (reader, writer):
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: paged\r\nContent-Type: appl")
        assert await read_until_closed(reader) == b""


async def test_a_silent_connection_is_cut_off(url: str) -> None:
    async with raw(url) as (reader, writer):
        assert await read_until_closed(reader) == b""


async def test_partial_headers_after_a_response_are_cut_off(url: str) -> None:
    async with raw(url) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: paged\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"}"), CLOSE_WITHIN_S)
        assert response_of(first)[0] == 200
        writer.write(b"GET /health HTTP/1.1\r\nHo")  # keep-alive, then a request that never completes
        assert await read_until_closed(reader) == b""


async def test_a_body_shorter_than_its_content_length_gets_408(url: str, engine: FakeEngine) -> None:
    async with raw(url) as (reader, writer):
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: paged\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt": "x"'
        )
        status, headers, body = response_of(await read_until_closed(reader))
    assert status == 408 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert engine.submitted == []


async def test_a_trickled_body_gets_408(url: str) -> None:
    async with raw(url) as (reader, writer):
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: paged\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        for _ in range(int(CLOSE_WITHIN_S * 10)):  # a byte every tenth of a second: never done
            writer.write(b"1\r\n \r\n")
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"}"), 0.1)
                break
            except TimeoutError:
                continue
    assert response_of(answer)[0] == 408


async def test_connections_beyond_the_cap_get_503(url: str) -> None:
    async with raw(url) as first, raw(url) as second, raw(url) as third:
        for _, writer in (first, second, third):
            writer.write(b"GET /health HTTP/1.1\r\nHost: paged\r\n\r\n")
        for reader, _ in (first, second, third):
            assert response_of(await asyncio.wait_for(reader.readuntil(b"}"), CLOSE_WITHIN_S))[0] == 200
        async with raw(url) as (reader, writer):
            writer.write(b"GET /health HTTP/1.1\r\nHost: paged\r\n\r\n")
            status, headers, body = response_of(await read_until_closed(reader))
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    async with httpx.AsyncClient(base_url=url) as client:  # the three closed: room again
        assert (await client.get("/health")).status_code == 200


async def test_a_slow_stream_is_not_cut_off(url: str, engine: FakeEngine) -> None:
    """The header timeout covers waiting for a request, never a response being streamed."""
    engine.step_delay_s = 0.1
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body = {"prompt": "x", "max_tokens": 12, "stream": True}  # 1.2 s of streaming, over twice the timeouts
        async with client.stream("POST", "/v1/completions", json=body) as response:
            text = (await response.aread()).decode()
    assert text.endswith("data: [DONE]\n\n") and text.count('"text"') == 12
