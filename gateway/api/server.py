"""Serving the API app with uvicorn inside an asyncio loop the caller owns (uvloop under pagedd)."""

from __future__ import annotations

import functools
import resource

import uvicorn
from starlette.types import ASGIApp

from paged.gateway.api.http_protocol import GuardedH11Protocol
from paged.shared.config import HttpConfig
from paged.shared.logging import get_logger

log = get_logger("gateway.api")

# File descriptors beyond the HTTP connections: worker sockets, the admin socket, logs, model files.
SPARE_FILE_DESCRIPTORS = 256


def http_server(app: ASGIApp, host: str, port: int, limits: HttpConfig | None = None) -> uvicorn.Server:
    """A server to `await server.serve()`; set `server.should_exit = True` to stop it gracefully.
    Access logs are off: every request logs its own structured events with its request id."""
    limits = limits or HttpConfig()
    _raise_file_limit(limits.max_connections + SPARE_FILE_DESCRIPTORS)
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="off", access_log=False, log_config=None, timeout_graceful_shutdown=30,
        http=functools.partial(GuardedH11Protocol, limits=limits),  # type: ignore[arg-type]
    )  # fmt: skip
    return uvicorn.Server(config)


def _raise_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) toward the hard one, so
    the connection cap, not accept() failing with EMFILE, is what turns clients away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning("http.file_limit_low", hard_limit=hard, wanted=wanted, hint="lower --max-connections or raise LimitNOFILE")

