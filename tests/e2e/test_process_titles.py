"""`ps` names paged's processes: the gateway `paged-gateway`, each worker `paged-worker N`, not
`python -c from multiprocessing.spawn ...` (setproctitle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.daemon_process import start_daemon

pytestmark = pytest.mark.slow


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads process titles from /proc (Linux)")
def test_gateway_and_workers_show_their_names(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--null-model", "--workers", "2")
    try:
        daemon.wait_ready()
        titles = sorted(_title(child) for child in _children(daemon.process.pid))
        assert _title(daemon.process.pid) == "paged-gateway"
        assert [title for title in titles if title.startswith("paged-worker")] == ["paged-worker 0", "paged-worker 1"]
    finally:
        daemon.stop()
