"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from paged.gateway.api.state import ApiState


async def list_models(request: Request) -> JSONResponse:
    state: ApiState = request.app.state.api
    model = {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "paged",
        "max_model_len": state.engine.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [model]})
