"""The daemon's signals, handled in its event loop.

- SIGTERM (systemctl stop) and SIGINT (Ctrl-C): the first one asks for a drain (see
  gateway/drain.py); a second one, while draining, exits at once: every running request ends with
  an error (a stream gets its error event, if its client can still be written to within
  EXIT_NOW_GRACE_S), the spawned workers are killed and the process exits with status 1. What that
  leaves behind (the workers' runtime directory) the next start removes
  (gateway/stale_runtime_dirs.py).
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
# A forced exit waits this long for the request handlers to write their error: a few turns of the
# event loop are enough, and "now" must stay now. A third signal does not wait at all.
EXIT_NOW_GRACE_S = 0.2
EXIT_NOW_MESSAGE = "the server was stopped at once (a second stop signal): the request did not finish"


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
        if self.engine.exiting_now:
            os._exit(EXIT_NOW_STATUS)
        aborted = self.engine.exit_now(EXIT_NOW_MESSAGE)
        log.warning("exiting_now", signal=signum.name, reason="second stop signal while draining", requests_aborted=aborted)
        assert self._loop is not None
        self._loop.call_later(EXIT_NOW_GRACE_S, os._exit, EXIT_NOW_STATUS)

    def _on_hangup(self) -> None:
        if self.reload is None:
            log.warning("reload_ignored", reason="no --config file to re-read")
            return
        self.reload()
