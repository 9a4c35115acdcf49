"""Aborting a non-streaming request whose client went away: the handler races the ASGI
`http.disconnect` message and is cancelled if it loses (streams are cancelled by starlette)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from paged.shared.logging import get_logger

log = get_logger("gateway.api")

# nginx's "client closed request": logged, never seen by the departed client.
CLIENT_CLOSED_REQUEST = 499


async def cancel_on_disconnect(request: Request, handler: Coroutine[Any, Any, Response]) -> Response:
    """Run `handler` (called after the body has been read) unless the client disconnects first."""
    work = asyncio.ensure_future(handler)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    log.info("request.client_disconnected", path=request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
