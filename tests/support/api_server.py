"""Helpers for the HTTP API tests: the API app on a real uvicorn server on a free loopback port,
inside the test's event loop, and the stories260K tokenizer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.types import ASGIApp

from paged.gateway.api.server import http_server
from paged.shared.config import HttpConfig


@asynccontextmanager
async def serving(app: ASGIApp, limits: HttpConfig | None = None) -> AsyncIterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) while `app` is served."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = http_server(app, "127.0.0.1", port, limits)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
