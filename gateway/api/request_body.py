"""Reading a JSON request body under a size limit and decoding it into a msgspec Struct."""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

import msgspec
from starlette.requests import Request

from paged.gateway.api.errors import APIError

T = TypeVar("T")

# msgspec reports where a value failed as "... - at `$.messages[0].role`", and a missing field as
# "Object missing required field `prompt`" (plus the path of the object when nested).
_ERROR_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_FIELD = re.compile(r"missing required field `([^`]*)`")
_BAD_VALUE = re.compile(r"^(Expected `\w+` [<>]=|Invalid enum value)")  # the type was right, the value not


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length when given, else while it streams in (chunked uploads). A body that has not
    arrived whole within `timeout` seconds is refused with 408: a client sending less than its
    Content-Length, or a trickle, holds nothing for longer."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    return b"".join(chunks)


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode and type-check; a wrong type becomes a 400 naming the field in `param`."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        code = "invalid_value" if _BAD_VALUE.match(message) else "invalid_type"
        raise APIError(400, message, param=_param(message), code=code) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # msgspec recurses into nested arrays and objects, even ones it skips
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None


def _param(message: str) -> str | None:
    path = _ERROR_PATH.search(message)
    missing = _MISSING_FIELD.search(message)
    parts = [p for p in (path.group(1) if path else "", missing.group(1) if missing else "") if p]
    return ".".join(parts) or None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
