"""Where a host KV store arena lives: /dev/shm/NAME (POSIX shared memory). The worker creates and
maps it (worker/kv_store.py); `pagedd serve` owns its lifetime (gateway/kv_store_lease.py). The
worker names a draft ".NAME.PID.ID" while it writes the header, then links it into place."""

from __future__ import annotations

from pathlib import Path

SHM_DIR = Path("/dev/shm")


def store_path(name: str) -> Path:
    """The arena's path; ValueError for a name that is not a plain, visible file name."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad KV store name {name!r}: a file name without '/' or a leading '.'")
    return SHM_DIR / name


def draft_prefix(name: str) -> str:
    """The file names of a worker's unfinished arenas of this name start with this."""
    return f".{name}."
