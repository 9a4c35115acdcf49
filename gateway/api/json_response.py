"""JSON responses encoded by msgspec: faster than json.dumps, and a -inf logprob becomes null
rather than the invalid JSON token `-Infinity`."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import JSONResponse


class MsgspecJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)
