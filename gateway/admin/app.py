"""The admin API: a small starlette app, served only on the admin socket (or a loopback port with a
token), never beside the public OpenAI API.

GET  /v1/status                     version, model, uptime, workers (with roles), queues, policy, KV transfers
GET  /v1/workers                    worker names
GET  /v1/workers/{worker}/memmap    every block of that worker's pool, with the pool's figures
GET  /v1/requests                   unfinished requests, longest-lived first
GET  /v1/requests/{id}
GET  /v1/cache                      prefix cache summary per worker
POST /v1/requests/{id}/abort
POST /v1/drain | /v1/resume | /v1/flush-cache
POST /v1/log-level                  {"level": "debug"}
Errors are {"error": message} with a 4xx status.
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from paged.gateway.admin.views import AdminViews
from paged.gateway.engine_client import EngineAdmin
from paged.shared.logging import LEVELS, get_logger, set_log_level

log = get_logger("gateway.admin")


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status_code, media_type="application/json")


def _error(message: str, status_code: int) -> Response:
    return _json({"error": message}, status_code)


class TokenMiddleware:
    """Requires `Authorization: Bearer TOKEN` on every request (the loopback TCP listener)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error("missing or wrong admin token", 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdminHandlers:
    def __init__(self, engine: EngineAdmin, views: AdminViews) -> None:
        self.engine = engine
        self.views = views

    async def status(self, request: Request) -> Response:
        return _json(self.views.status())

    async def workers(self, request: Request) -> Response:
        return _json(self.views.workers())

    async def memmap(self, request: Request) -> Response:
        worker = request.path_params["worker"]
        memory = self.views.memory_map(worker)
        if memory is None:
            return _error(f"worker {worker!r} is unknown or not registered now (workers: {', '.join(self.views.workers())})", 404)
        return _json(memory)

    async def requests(self, request: Request) -> Response:
        return _json(self.views.requests())

    async def request(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        info = self.views.request(request_id)
        if info is None:
            return _error(f"no unfinished request {request_id!r}", 404)
        return _json(info)

    async def cache(self, request: Request) -> Response:
        return _json(self.views.cache())

    async def abort(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        if not await self.engine.abort(request_id):
            return _error(f"no unfinished request {request_id!r}", 404)
        log.info("admin_abort", request_id=request_id)
        return _json({"aborted": request_id})

    async def drain(self, request: Request) -> Response:
        self.engine.drain()
        return _json({"draining": True})

    async def resume(self, request: Request) -> Response:
        self.engine.resume()
        return _json({"draining": False})

    async def flush_cache(self, request: Request) -> Response:
        return _json({"flushed_blocks": self.engine.flush_prefix_cache(), "flushed_store_entries": self.engine.flush_kv_store()})

    async def log_level(self, request: Request) -> Response:
        try:
            level = msgspec.json.decode(await request.body(), type=dict[str, str])["level"].lower()
        except (msgspec.DecodeError, KeyError):
            return _error('expected a JSON body {"level": LEVEL}', 400)
        if level not in LEVELS:
            return _error(f"unknown log level {level!r}; choose from {', '.join(LEVELS)}", 400)
        set_log_level(level)
        log.warning("admin_log_level", level=level)  # warning: visible at every level but error/critical
        return _json({"level": level})


def build_admin_app(
    engine: EngineAdmin,
    served_model_name: str,
    metrics_registry: CollectorRegistry | None = None,
    token: str | None = None,
) -> Starlette:
    handlers = AdminHandlers(engine, AdminViews(engine, served_model_name, metrics_registry))
    routes = [
        Route("/v1/status", handlers.status, methods=["GET"]),
        Route("/v1/workers", handlers.workers, methods=["GET"]),
        Route("/v1/workers/{worker}/memmap", handlers.memmap, methods=["GET"]),
        Route("/v1/requests", handlers.requests, methods=["GET"]),
        Route("/v1/requests/{request_id}", handlers.request, methods=["GET"]),
        Route("/v1/requests/{request_id}/abort", handlers.abort, methods=["POST"]),
        Route("/v1/cache", handlers.cache, methods=["GET"]),
        Route("/v1/drain", handlers.drain, methods=["POST"]),
        Route("/v1/resume", handlers.resume, methods=["POST"]),
        Route("/v1/flush-cache", handlers.flush_cache, methods=["POST"]),
        Route("/v1/log-level", handlers.log_level, methods=["POST"]),
    ]
    middleware = [Middleware(TokenMiddleware, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _routing_error})


async def _routing_error(request: Request, exc: Exception) -> Response:
    """An unknown path (404) or method (405) answers in the API's error shape, not starlette's plain text."""
    assert isinstance(exc, HTTPException)
    return _error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)
