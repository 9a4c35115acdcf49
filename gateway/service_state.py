"""What the gateway tells its service manager (systemd, via shared/systemd_notify.py) while it runs:
a one-line state in STATUS=, and WATCHDOG=1 pings sent from the event loop itself, so a loop that
hangs stops pinging and systemd restarts the service."""

from __future__ import annotations

import asyncio

from paged.gateway.engine import AsyncEngine
from paged.shared.systemd_notify import SystemdNotifier

STATUS_REFRESH_S = 1.0  # how often a change of state (a worker lost or back) reaches STATUS=


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def starting_status(engine: AsyncEngine) -> str:
    return f"starting: waiting for {_count(len(engine.replicas), 'worker')} to register"


def draining_status(engine: AsyncEngine) -> str:
    return f"draining: {_count(engine.num_requests(), 'request')} running"


def serving_status(engine: AsyncEngine) -> str:
    """The state after READY=1, as STATUS= shows it."""
    if engine.is_draining():
        return draining_status(engine)
    ready = sum(replica.ready for replica in engine.replicas)
    total = len(engine.replicas)
    if ready == total:
        return f"serving {_count(total, 'worker')}"
    return f"serving {ready} of {_count(total, 'worker')}"


async def ping_watchdog(notifier: SystemdNotifier) -> None:
    """WATCHDOG=1 at half the watchdog timeout until cancelled, from the start: systemd may arm the
    watchdog before READY=1, and the workers' registration can take minutes."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def follow_status(notifier: SystemdNotifier, engine: AsyncEngine) -> None:
    """After READY=1, until cancelled: STATUS= whenever the state changes (a worker lost or back, draining)."""
    if not notifier.enabled:
        return
    last_status = serving_status(engine)
    while True:
        await asyncio.sleep(STATUS_REFRESH_S)
        status = serving_status(engine)
        if status != last_status:
            notifier.status(status)
            last_status = status
