"""Runtime directories a forced exit left behind, found and removed at the next start.

`pagedd serve` keeps its workers' ipc sockets in a private directory (worker_processes.RuntimeDir),
removed when the daemon stops. A forced exit (a second SIGTERM, SIGKILL, a crash) skips that, and
the directory with its dead socket files stays. Each directory therefore names its owner in a file:
the gateway's pid and the kernel's start time of that process (a pid alone may be reused). A later
start removes a directory only when all of these hold:
- it has that owner file (a directory without one is not known to be ours, whatever its name);
- it belongs to this user and is a real directory, not a link;
- its owner process is gone (no process with that pid, or one that started at another time);
- no socket in it has a listener (a worker of the dead gateway may live on for a few seconds).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from paged.shared.logging import get_logger

log = get_logger("gateway.runtime_dir")

OWNER_FILE = "owner"


def process_identity(pid: int) -> str:
    """"PID START_TIME": the start time (in clock ticks since boot, /proc/PID/stat's 22nd field)
    tells this process from a later one given the same pid; "PID" alone where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return str(pid)
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def owner_alive(identity: str) -> bool:
    pid_text, _, _ = identity.partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if Path("/proc/self/stat").exists():
        return process_identity(pid) == identity.strip()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def has_listener(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def claim(directory: Path) -> None:
    """Name this process as the owner of `directory` (just created, empty)."""
    (directory / OWNER_FILE).write_text(process_identity(os.getpid()))


def remove_stale_runtime_dirs(base: Path, prefix: str) -> list[Path]:
    """Remove the directories `base/prefix*` that a dead owner left behind (see the module's rules).
    Returns what was removed."""
    removed = []
    for directory in base.glob(f"{prefix}*"):
        try:
            if directory.is_symlink() or not directory.is_dir() or directory.stat().st_uid != os.getuid():
                continue
            owner = (directory / OWNER_FILE).read_text()
        except OSError:
            continue
        if owner_alive(owner) or any(has_listener(path) for path in directory.glob("*.sock")):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        log.info("stale_runtime_dir_removed", path=str(directory), owner=owner.strip())
        removed.append(directory)
    return removed
