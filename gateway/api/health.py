"""GET /health: 200 when a worker is ready, 503 while starting or draining (load balancers and
systemd readiness checks read the status; the body says which)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from paged.gateway.api.state import ApiState


async def health(request: Request) -> JSONResponse:
    state: ApiState = request.app.state.api
    engine = state.engine
    if engine.is_draining():
        return JSONResponse({"status": "draining"}, status_code=503)
    if not engine.is_ready():
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready", "model": state.served_model_name})
