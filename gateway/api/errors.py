"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, and the statuses we use."""

from __future__ import annotations

import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paged.gateway.engine_client import AdmissionError, Refusal
from paged.shared.logging import get_logger

log = get_logger("gateway.api")

# OpenAI's `type` for each status we send; the openai client picks its exception class by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

DEFAULT_RETRY_AFTER_S = 1.0

# How each kind of engine refusal reaches the client: (HTTP status, OpenAI error code).
REFUSALS = {
    Refusal.TOO_LARGE: (400, None),
    Refusal.INVALID: (400, None),
    Refusal.QUEUE_FULL: (429, "rate_limit_exceeded"),
    Refusal.UNAVAILABLE: (503, "server_unavailable"),
}


class APIError(Exception):
    """An error the client sees: raised anywhere while handling a request, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def from_admission(cls, error: AdmissionError) -> APIError:
        status, code = REFUSALS[error.kind]
        retry_after = error.retry_after
        if retry_after is None and status in (429, 503):
            retry_after = DEFAULT_RETRY_AFTER_S  # clients and proxies back off only when told when to retry
        return cls(status, error.message, code=code, retry_after=retry_after)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return APIError(404, f"{request.method} {request.url.path} not found", code="not_found").response()
    return APIError(exc.status_code, str(exc.detail)).response()



class InternalErrorMiddleware:
    """A bug, not the client's fault: a 500 in OpenAI's shape, and the traceback in one structured log
    event (starlette's own handler re-raises, and uvicorn then prints it over many plain-text lines).
    Once a response has started (a stream), the connection is closed instead: nothing else can be sent."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("request.internal_error", path=scope.get("path"), response_started=started, exc_info=exc)
            if not started:
                await APIError(500, "internal server error", code="internal_error").response()(scope, receive, send)
