"""The gateway daemon's life: register the workers, serve HTTP, drain on SIGTERM/SIGINT, shut down."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import socket
from collections.abc import Callable

from starlette.applications import Starlette

from paged.gateway.admin.listener import AdminListener, AdminSettings
from paged.gateway.admin.server import AdminServer
from paged.gateway.api.app import build_app
from paged.gateway.api.server import http_server
from paged.gateway.drain import DEFAULT_DRAIN_TIMEOUT_S, drain
from paged.gateway.engine import AsyncEngine
from paged.gateway.service_state import draining_status, follow_status, ping_watchdog, serving_status, starting_status
from paged.gateway.signals import DaemonSignals
from paged.shared.config import HttpConfig
from paged.shared.logging import get_logger
from paged.shared.sampling_params import GenerationDefaults
from paged.shared.systemd_notify import SystemdNotifier
from paged.shared.tokenizer import Tokenizer

log = get_logger("gateway.daemon")


async def run_daemon(
    engine: AsyncEngine,
    tokenizer: Tokenizer,
    served_model_name: str,
    listener: socket.socket,
    api_key: str | None,
    admin: AdminSettings | None = None,
    admin_listener: AdminListener | None = None,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
    reload: Callable[[AsyncEngine], None] | None = None,
    http: HttpConfig | None = None,
    generation_defaults: GenerationDefaults = GenerationDefaults(),
) -> None:
    """Serve until SIGTERM/SIGINT, then drain (gateway/drain.py: no new requests, running ones get
    `drain_timeout` seconds) and shut down; SIGHUP calls `reload` (gateway/signals.py). systemd hears
    of each state: READY=1 once the workers registered and the port listens (gateway/service_state.py).
    `listener` (gateway/http_listener.py) and `admin_listener` (bind_admin_socket) are bound by the
    caller before anything slow, and closed here."""
    notifier = SystemdNotifier.from_environment()  # before the workers spawn: they must not inherit it
    signals = DaemonSignals(engine, functools.partial(reload, engine) if reload else None)
    signals.install()
    stopping = asyncio.create_task(signals.stop.wait())
    pinging = asyncio.create_task(ping_watchdog(notifier), name="systemd-watchdog")
    try:
        notifier.status(starting_status(engine))
        starting = asyncio.create_task(engine.start(), name="engine-start")
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while the workers load: nothing to drain
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        starting.result()
        # What exists now (tokenizer, block pools, queues) lives as long as the daemon: moving it out of
        # the collector's generations keeps full collections from rescanning it while serving.
        gc.collect()
        gc.freeze()
        app = build_app(engine, tokenizer, served_model_name, api_key, http, generation_defaults)
        admin_server = AdminServer(engine, admin, served_model_name, admin_listener, app.state.api.metrics.registry) if admin else None
        await _serve(engine, app, served_model_name, admin_server, listener, notifier, stopping, drain_timeout, http)
    finally:
        stopping.cancel()
        pinging.cancel()
        listener.close()
        if admin_listener is not None:
            admin_listener.close()
        signals.remove()
        notifier.close()


async def _serve(
    engine: AsyncEngine,
    app: Starlette,
    served_model_name: str,
    admin_server: AdminServer | None,
    listener: socket.socket,
    notifier: SystemdNotifier,
    stopping: asyncio.Task[object],
    drain_timeout: float,
    http: HttpConfig | None,
) -> None:
    host, port = listener.getsockname()[:2]
    if admin_server is not None:
        try:
            await admin_server.start()
        except BaseException:
            await engine.shutdown()
            raise
    server = http_server(app, host, port, http)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the signals are gateway/signals.py's
    serving = asyncio.create_task(server.serve(sockets=[listener]), name="http")
    informing: asyncio.Task[None] | None = None
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            notifier.ready(serving_status(engine))
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            log.info("serving", progress=f"serving {served_model_name} on {url}", host=host, port=port, model=served_model_name, workers=len(engine.replicas))
            informing = asyncio.create_task(follow_status(notifier, engine), name="systemd-status")
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        engine.begin_shutdown()
        notifier.stopping(draining_status(engine))
        await drain(engine, drain_timeout)
        if engine.exiting_now:  # the handlers write their streams' errors until gateway/signals.py exits
            await asyncio.Event().wait()
        server.should_exit = True
        await serving
    finally:
        if informing is not None:
            informing.cancel()
        if admin_server is not None:
            await admin_server.stop()
        await engine.shutdown()
