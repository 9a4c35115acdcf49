"""Serving the admin API inside the daemon's event loop: on its unix socket (bound beforehand,
gateway/admin/listener.py), and optionally on a loopback TCP port that requires a token.

Running in the engine's loop is what keeps the admin's reads consistent: no scheduler step runs
halfway through building a memory map.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry

from paged.gateway.admin.app import build_admin_app
from paged.gateway.admin.listener import AdminListener, AdminSettings
from paged.gateway.engine_client import EngineAdmin
from paged.shared.logging import get_logger

log = get_logger("gateway.admin")


def _server(app: object, **config: object) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False, log_config=None, **config))  # type: ignore[arg-type]
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the daemon owns the signals
    return server


class AdminServer:
    """Serves the admin API on `listener` (bound beforehand: bind_admin_socket) and, when the
    settings name one, on a loopback port."""

    def __init__(
        self,
        engine: EngineAdmin,
        settings: AdminSettings,
        served_model_name: str,
        listener: AdminListener | None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.served_model_name = served_model_name
        self.listener = listener
        self.metrics_registry = metrics_registry
        self._servers: list[uvicorn.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def socket_path(self) -> Path | None:
        return self.listener.path if self.listener is not None else None

    async def start(self) -> None:
        settings = self.settings
        if self.listener is not None:
            app = build_admin_app(self.engine, self.served_model_name, self.metrics_registry)
            self._launch(_server(app), [self.listener.sock])
            log.info("admin_listening", progress=f"admin API on {self.listener.path} (pagedctl)", socket=str(self.listener.path))
        if settings.port is not None:
            app = build_admin_app(self.engine, self.served_model_name, self.metrics_registry, token=settings.token)
            self._launch(_server(app, host=settings.host, port=settings.port), None)
            log.info("admin_listening", host=settings.host, port=settings.port)

    def _launch(self, server: uvicorn.Server, sockets: list[socket.socket] | None) -> None:
        self._servers.append(server)
        self._tasks.append(asyncio.create_task(server.serve(sockets=sockets), name="admin"))

    async def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.listener is not None:
            self.listener.close()
