"""The gateway daemon's life: register the workers, serve HTTP, drain on SIGTERM/SIGINT, shut down."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from gateway.admin.server import AdminServer, AdminSettings
from gateway.api.app import build_app
from gateway.api.server import http_server
from gateway.engine import AsyncEngine
from shared.logging import get_logger
from shared.tokenizer import Tokenizer

log = get_logger("gateway.daemon")


async def run_daemon(
    engine: AsyncEngine,
    tokenizer: Tokenizer,
    served_model_name: str,
    host: str,
    port: int,
    api_key: str | None,
    admin: AdminSettings | None = None,
) -> None:
    """Serve until a signal. The first SIGTERM/SIGINT drains: no new requests (503), open
    responses finish (uvicorn's graceful shutdown), then the workers are told to exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await engine.start()
    app = build_app(engine, tokenizer, served_model_name, api_key)
    admin_server = AdminServer(engine, admin, served_model_name, app.state.api.metrics.registry) if admin else None
    if admin_server is not None:
        try:
            await admin_server.start()
        except BaseException:
            await engine.shutdown()
            raise
    server = http_server(app, host, port)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # signals drain the engine first (above)
    serving = asyncio.create_task(server.serve(), name="http")
    log.info("serving", host=host, port=port, model=served_model_name, workers=len(engine.replicas))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        engine.drain()
        server.should_exit = True
        await serving
    finally:
        stopping.cancel()
        if admin_server is not None:
            await admin_server.stop()
        await engine.shutdown()
