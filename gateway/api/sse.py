"""Server-Sent Events framing of a generation: `data: {json}\\n\\n` per chunk, an error event if
the engine fails mid-stream, and always `data: [DONE]\\n\\n` last."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from starlette.responses import StreamingResponse

from paged.gateway.api.generation import Generation, GenerationFailed

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def sse_response(request_id: str, generation: Generation, payloads: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Stream `payloads` (built from `generation`). When the client disconnects, starlette cancels
    the stream; closing the generation then aborts the engine requests."""
    return StreamingResponse(
        _events(request_id, generation, payloads),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id},
    )


async def _events(request_id: str, generation: Generation, payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    failure = None
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            async for payload in payloads:
                yield sse_event(payload)
        except GenerationFailed as e:
            failure = e.error
        finally:
            await generation.close()
        if failure is not None:
            yield sse_event(failure.body())
        yield DONE
