"""Graceful drain (the first SIGTERM/SIGINT): stop admitting, let running requests finish for up to
`--drain-timeout` seconds, then abort what is left with an error that says why."""

from __future__ import annotations

import asyncio

from paged.gateway.engine import AsyncEngine
from paged.shared.logging import get_logger

log = get_logger("gateway.drain")

DEFAULT_DRAIN_TIMEOUT_S = 30.0


async def drain(engine: AsyncEngine, timeout: float) -> None:
    """New requests get 503 and /health says draining from here on; returns when no request runs."""
    engine.drain()
    try:
        await asyncio.wait_for(engine.wait_drained(), timeout)
    except TimeoutError:
        message = f"the server is shutting down: the request did not finish within the drain timeout of {timeout:g} s"
        aborted = engine.abort_all(message)
        log.warning("drain_timed_out", drain_timeout_s=timeout, aborted=aborted)
    else:
        if not engine.exiting_now:  # a forced exit ended them: nothing drained
            log.info("drained")
