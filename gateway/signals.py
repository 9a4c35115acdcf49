"""The daemon's signals, handled in its event loop.

- SIGTERM (systemctl stop) and SIGINT (Ctrl-C): the first one asks for a drain (see
  gateway/drain.py); a second one, while draining, exits at once: the spawned workers are killed and
  the process exits with status 1 without finishing anything.
- SIGHUP (systemctl reload): re-read the configuration file's reloadable subset.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

from paged.gateway.engine import AsyncEngine
from paged.shared.logging import get_logger

log = get_logger("gateway.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_NOW_STATUS = 1


class DaemonSignals:
    def __init__(self, engine: AsyncEngine, reload: Callable[[], None] | None) -> None:
        self.engine = engine
        self.reload = reload
        self.stop = asyncio.Event()  # set by the first SIGTERM/SIGINT
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self._on_stop, signum)
        self._loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def remove(self) -> None:
        if self._loop is not None:
            for signum in (*STOP_SIGNALS, signal.SIGHUP):
                self._loop.remove_signal_handler(signum)
            self._loop = None

    def _on_stop(self, signum: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("shutdown_requested", signal=signum.name, requests=self.engine.num_requests())
            self.stop.set()
            return
        log.warning("exiting_now", signal=signum.name, reason="second stop signal while draining", requests=self.engine.num_requests())
        self.engine.kill_worker_processes()
        os._exit(EXIT_NOW_STATUS)

    def _on_hangup(self) -> None:
        if self.reload is None:
            log.warning("reload_ignored", reason="no --config file to re-read")
            return
        self.reload()
