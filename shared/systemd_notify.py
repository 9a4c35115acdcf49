"""sd_notify(3): readiness, status and watchdog pings to systemd (units with Type=notify).

The protocol is one datagram of `KEY=value` lines sent to the unix socket named by $NOTIFY_SOCKET
(a leading `@` means an abstract socket name), so it is written here in a few lines rather than
taken from the `sdnotify` package, whose last release is from 2017. Without $NOTIFY_SOCKET (not
under systemd) every call is a no-op.

`from_environment()` removes the variables from the environment, as sd_notify's unset_environment
does: the worker processes `pagedd serve` spawns must not report readiness for the gateway's unit.
"""

from __future__ import annotations

import os
import socket

from paged.shared.logging import get_logger

log = get_logger("shared.systemd_notify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


class SystemdNotifier:
    """Sends state changes to systemd; `address=None` (not under systemd) makes it a no-op."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._target = "\0" + address[1:] if address and address.startswith("@") else address
        # Non-blocking: a reader that falls behind must cost a lost message, never a stalled event loop.
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) if address else None
        self.watchdog_usec = watchdog_usec if address else None
        self._failing = False  # log the first failure of a streak only

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """The notifier systemd set up for this process, taking its variables out of os.environ."""
        address = os.environ.pop(NOTIFY_SOCKET, None) or None
        usec = os.environ.pop(WATCHDOG_USEC, None)
        pid = os.environ.pop(WATCHDOG_PID, None)
        watched = usec is not None and usec.isdigit() and (pid is None or pid == str(os.getpid()))
        return cls(address, int(usec) if watched else None)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, *lines: str) -> None:
        if self._socket is None or self._target is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._target)
        except OSError as exc:  # systemd gone or its queue full: the service itself goes on
            if not self._failing:
                log.warning("sd_notify_failed", address=self.address, error=str(exc))
            self._failing = True
        else:
            self._failing = False
