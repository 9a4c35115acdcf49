"""A tiny stand-in for `pagedd serve`: OpenAI-shaped streamed /v1/completions, /v1/models, /health and
paged's /metrics names, so the benchmark tool can be tested without a model. Requests whose prompt
starts with a multiple of 5 are refused with 429, and with `stall_every` set, those starting with a multiple
of it stop sending after their first token, to exercise the tool's accounting of rejections and failures."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from paged.ops.bench.servers import free_port

REJECT_EVERY = 5
TOKEN_DELAY_S = 0.002
BLOCKS_TOTAL = 1000
BLOCK_SIZE = 16


class FakeState:
    def __init__(self) -> None:
        self.running = 0
        self.blocks_used = 0
        self.prefix_queries = 0
        self.prefix_hits = 0


def build_app(max_model_len: int, stall_every: int | None) -> Starlette:
    state = FakeState()

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": max_model_len}]})

    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def metrics(_: Request) -> PlainTextResponse:
        lines = [
            f'paged_requests_running{{worker="0"}} {state.running}',
            'paged_requests_waiting{worker="0"} 0',
            f'paged_kv_blocks_total{{worker="0"}} {BLOCKS_TOTAL}',
            f'paged_kv_block_size{{worker="0"}} {BLOCK_SIZE}',
            f'paged_kv_blocks_used{{worker="0"}} {state.blocks_used}',
            f'paged_kv_blocks_free{{worker="0"}} {BLOCKS_TOTAL - state.blocks_used}',
            'paged_kv_blocks_cached{worker="0"} 0',
            f'paged_kv_utilization{{worker="0"}} {0.9 if state.running else 0.0}',
            "# TYPE paged_prefix_cache_queries_tokens counter",
            f'paged_prefix_cache_queries_tokens_total{{worker="0"}} {state.prefix_queries}',
            "# TYPE paged_prefix_cache_hits_tokens counter",
            f'paged_prefix_cache_hits_tokens_total{{worker="0"}} {state.prefix_hits}',
            "# TYPE paged_preemptions counter",
            'paged_preemptions_total{worker="0"} 0',
            "# TYPE paged_block_waits counter",
            'paged_block_waits_total{worker="0"} 0',
            "# TYPE paged_computed_tokens counter",
            f'paged_computed_tokens_total{{worker="0"}} {state.prefix_queries - state.prefix_hits}',
            "# TYPE paged_recomputed_tokens counter",
            'paged_recomputed_tokens_total{worker="0"} 0',
            'paged_kv_thrashing{worker="0"} 0',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        prompt, max_tokens, n = body["prompt"], body["max_tokens"], body.get("n", 1)
        if prompt[0] % REJECT_EVERY == 0:
            error = {"message": "too many waiting requests", "type": "rate_limit_error", "param": None, "code": 429}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        if len(prompt) + max_tokens > max_model_len:
            error = {"message": "prompt too long", "type": "invalid_request_error", "param": "prompt", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        state.prefix_queries += len(prompt)
        state.prefix_hits += len(prompt) // 2

        async def events() -> AsyncIterator[str]:
            blocks = (len(prompt) + max_tokens) // 16 + 1
            state.running += n
            state.blocks_used += blocks
            try:
                for position in range(max_tokens):
                    await asyncio.sleep(TOKEN_DELAY_S)
                    if position == 1 and stall_every and prompt[0] % stall_every == 0:
                        await asyncio.Event().wait()  # stuck: never another byte
                    for index in range(n):
                        choice = {"index": index, "text": "a", "finish_reason": None}
                        yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
                for index in range(n):
                    choice = {"index": index, "text": "", "finish_reason": "length"}
                    yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
                usage = {"prompt_tokens": len(prompt), "completion_tokens": n * max_tokens}
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.running -= n
                state.blocks_used -= blocks

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/v1/models", models),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


@contextmanager
def fake_server(max_model_len: int = 512, stall_every: int | None = None) -> Iterator[str]:
    """Serve the fake API on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(max_model_len, stall_every), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
