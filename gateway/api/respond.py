"""What the generating endpoints share once the prompts and sampling parameters are known: start the
generation and answer with an SSE stream of its chunks (sse.py closes it and reports a failure), or with
the whole object when it has finished (closed here; a failure becomes the error response)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import structlog
from starlette.responses import Response

from paged.gateway.api.generation import Generation, GenerationFailed
from paged.gateway.api.json_response import MsgspecJSONResponse
from paged.gateway.api.protocol import SamplingRequest
from paged.gateway.api.sse import sse_response
from paged.gateway.api.state import ApiState
from paged.gateway.api.validation import stop_strings
from paged.shared.logging import get_logger
from paged.shared.sampling_params import SamplingParams

log = get_logger("gateway.api")

Body = TypeVar("Body", bound=SamplingRequest)


class Formatter(Protocol):
    """An endpoint's OpenAI objects: chunks while streaming, one object otherwise."""

    def chunks(self, generation: Generation) -> AsyncIterator[dict[str, Any]]: ...

    async def collect(self, generation: Generation) -> dict[str, Any]: ...


async def respond(
    state: ApiState,
    body: Body,
    id_prefix: str,
    prompts: list[tuple[list[int], SamplingParams]],
    formatter: Callable[[ApiState, str, Body], Formatter],
    /,
    **log_fields: Any,
) -> Response:
    """Generate for each (prompt, params) and answer; `log_fields` describe the request in its log event."""
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    generation = Generation(
        state.engine, state.tokenizer, state.metrics, request_id, prompts, stop_strings(body),
        priority=body.priority, cache_salt=body.cache_salt,
    )
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        log.info("request.received", **log_fields, stream=bool(body.stream))
        await generation.start()
        objects = formatter(state, request_id, body)
        if body.stream:
            return sse_response(request_id, generation, objects.chunks(generation))
        try:
            whole = await objects.collect(generation)
        except GenerationFailed as e:
            raise e.error from None
        finally:
            await generation.close()
        return MsgspecJSONResponse(whole, headers={"X-Request-Id": request_id})
