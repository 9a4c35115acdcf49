"""--api-key: every /v1/ request needs `Authorization: Bearer <key>`; /health and /metrics stay
open for probes and scrapers, as in vLLM."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from paged.gateway.api.errors import APIError

PROTECTED_PREFIX = "/v1/"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                error = APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self._app(scope, receive, send)
