"""uvicorn's h11 protocol with the two guards it lacks: a header read timeout and a connection cap.

uvicorn closes a keep-alive connection that stays silent, but a client that sends half its headers
(or a body shorter than its Content-Length, then nothing) is held forever, and each one holds a file
descriptor. Here a connection must complete its request's headers within `header_timeout` seconds of
opening, or of its previous response; the body has its own timeout, enforced while the app reads it
(request_body.py). A connection opened while `max_connections` are already open gets a 503 in
OpenAI's shape and is closed; it is answered, not dropped, so clients and load balancers see why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from paged.gateway.api.errors import DEFAULT_RETRY_AFTER_S, APIError
from paged.shared.config import HttpConfig
from paged.shared.logging import get_logger

log = get_logger("gateway.api")


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, limits: HttpConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            log.warning("http.connection_refused", open_connections=len(self.connections), limit=self._limits.max_connections)
            self.app = _over_capacity  # answers whatever request comes, then closes
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # The next request's headers (or what is left of an unread body) must come in time too.
            self._await_headers()

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its headers came after all
        if not self.transport.is_closing():
            log.info("http.header_timeout", client=self.client, timeout_s=self._limits.header_timeout)
            self.transport.close()


async def _over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    error = APIError(503, "too many open connections", code="too_many_connections", retry_after=DEFAULT_RETRY_AFTER_S)
    response = error.response()
    response.headers["connection"] = "close"
    await response(scope, receive, send)
