"""`pagedd serve`'s hold on its host KV store arena (docs/kv-store.md): the workers it spawns create
and attach the arena in /dev/shm (worker/kv_store.py); the server owns its lifetime.

While it runs, the server holds an exclusive lock beside the arena (an flock, which the kernel
drops when the process dies, however it dies), so a second server given the same store name fails
at start instead of sharing an arena whose index it does not know. At start, an arena left by a
crashed run (and any half-written one of its workers) is removed; at exit, the arena is.
"""

from __future__ import annotations

import fcntl
import os

from paged.shared.kv_store_path import draft_prefix, store_path
from paged.shared.logging import get_logger
from paged.shared.startup_failure import StartupError

log = get_logger("gateway.kv_store")


class KVStoreLease:
    def __init__(self, name: str) -> None:
        try:
            self.path = store_path(name)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.name = name
        self.lock_path = self.path.with_name(f".{name}.lock")
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Take the store for this server, removing a crashed run's leftovers; StartupError if
        another live server holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.lock_path.read_text().strip() or "another process"
            raise StartupError(
                f"KV store {self.name} is in use by pagedd serve pid {holder}: give this server another --kv-store-name"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        leftovers = [self.path] if self.path.exists() else []
        leftovers += [p for p in self.path.parent.glob(f"{draft_prefix(self.name)}*") if p != self.lock_path]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
            log.warning("kv_store_leftover_removed", path=str(leftover))

    def release(self) -> None:
        """Remove the arena (workers still attached keep their mapping until they exit) and the lock."""
        if self._lock_fd is None:
            return
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        log.info("kv_store_removed", path=str(self.path))
