"""Serving the API app with uvicorn inside an asyncio loop the caller owns (uvloop under pagedd)."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp


def http_server(app: ASGIApp, host: str, port: int) -> uvicorn.Server:
    """A server to `await server.serve()`; set `server.should_exit = True` to stop it gracefully.
    Access logs are off: every request logs its own structured events with its request id."""
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="off", access_log=False, log_config=None, timeout_graceful_shutdown=30
    )
    return uvicorn.Server(config)

