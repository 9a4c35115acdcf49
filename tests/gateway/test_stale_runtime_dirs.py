"""Runtime directories a forced exit left behind are removed at the next start, and only those
(gateway/stale_runtime_dirs.py): ours, with their owner gone and nothing listening in them."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from paged.gateway.stale_runtime_dirs import OWNER_FILE, process_identity
from paged.gateway.worker_processes import RuntimeDir


def dead_identity() -> str:
    child = subprocess.Popen(["true"])
    identity = process_identity(child.pid)
    child.wait()
    return identity


def leftover(base: Path, name: str, owner: str | None, sockets: tuple[str, ...] = ("worker-0.sock",)) -> Path:
    directory = base / name
    directory.mkdir(mode=0o700)
    if owner is not None:
        (directory / OWNER_FILE).write_text(owner)
    for name in sockets:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(directory / name))  # closed: the file stays, nobody listens, as after SIGKILL
    return directory


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_a_dead_owners_directory_is_removed_at_the_next_start(base: Path) -> None:
    stale = leftover(base, "paged-stale1", dead_identity())
    pid_reused = leftover(base, "paged-stale2", f"{os.getpid()} 1")  # our pid, another start time
    runtime = RuntimeDir()
    assert not stale.exists() and not pid_reused.exists()
    assert (runtime.path / OWNER_FILE).read_text() == process_identity(os.getpid())
    runtime.close()
    assert not runtime.path.exists()


def test_what_may_still_be_in_use_or_is_not_ours_stays(base: Path) -> None:
    live_owner = leftover(base, "paged-live", process_identity(os.getpid()))
    no_owner_file = leftover(base, "paged-unknown", None)  # e.g. /tmp/paged-UID, the admin socket's
    other_prefix = leftover(base, "other-thing", dead_identity())
    listening = leftover(base, "paged-listening", dead_identity(), sockets=())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as worker:  # a worker of a dead gateway, still up
        worker.bind(str(listening / "worker-0.sock"))
        worker.listen()
        runtime = RuntimeDir()
    try:
        assert live_owner.exists() and no_owner_file.exists() and other_prefix.exists() and listening.exists()
    finally:
        runtime.close()
    link = base / "paged-link"
    link.symlink_to(leftover(base, "elsewhere", dead_identity()))
    RuntimeDir().close()
    assert (base / "elsewhere").exists()  # never followed through a link
