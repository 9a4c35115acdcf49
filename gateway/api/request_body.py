"""Reading a JSON request body under a size limit and decoding it into a msgspec Struct."""

from __future__ import annotations

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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length when given, else while it streams in (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode and type-check; a wrong type becomes a 400 naming the field in `param`."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        raise APIError(400, message, param=_param(message), code="invalid_type") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None


def _param(message: str) -> str | None:
    path = _ERROR_PATH.search(message)
    missing = _MISSING_FIELD.search(message)
    parts = [p for p in (path.group(1) if path else "", missing.group(1) if missing else "") if p]
    return ".".join(parts) or None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
