"""Startup failures of `pagedd serve`: a non-zero exit and one error line saying what and where,
without a traceback."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from support.daemon_process import Daemon, start_daemon

pytestmark = pytest.mark.slow


def _failure(daemon: Daemon) -> dict[str, object]:
    status = daemon.wait_exit(timeout=240)
    output = daemon.log_path.read_text()
    assert status != 0, output
    assert "Traceback" not in output, output
    failures = daemon.events("startup_failed")
    assert len([f for f in failures if f["component"] == "gateway"]) == 1, output
    return failures[-1]


def test_missing_model_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    failure = _failure(start_daemon(tmp_path, "--model", str(missing)))
    assert failure["level"] == "error"
    assert failure["error"] == f"model directory {missing} not found"


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failure = _failure(start_daemon(tmp_path, "--null-model", port=port))
    assert failure["error"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"


def test_worker_fails_to_start(tmp_path: Path, stories_dir: Path) -> None:
    """A checkpoint without its weights: the gateway loads the tokenizer, the worker cannot load the model."""
    model = tmp_path / "weightless"
    shutil.copytree(stories_dir, model, ignore=shutil.ignore_patterns("*.safetensors*", "*.bin", "*.pt"))
    daemon = start_daemon(tmp_path, "--model", str(model))
    failure = _failure(daemon)
    assert failure["component"] == "gateway"
    assert failure["error"] == "worker 0 process exited with code 1"
    worker_failures = [f for f in daemon.events("startup_failed") if f["component"] == "worker"]
    assert len(worker_failures) == 1
    assert worker_failures[0]["worker_id"] == "0"
    assert str(model) in str(worker_failures[0]["error"]), worker_failures


@pytest.mark.parametrize("given_by", ["env", "option"])
def test_admin_socket_in_use_refuses_the_start_before_the_model_loads(tmp_path: Path, given_by: str) -> None:
    """$PAGED_ADMIN_SOCKET behaves as --admin-socket: a live daemon's socket there refuses the start,
    checked before any worker spawns (so it fails in well under a second, not after the model load)."""
    path = tmp_path / "live-admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        if given_by == "env":
            daemon = start_daemon(tmp_path, env={"PAGED_ADMIN_SOCKET": str(path)})
        else:
            daemon = start_daemon(tmp_path, "--admin-socket", str(path))
        failure = _failure(daemon)
    assert failure["error"] == f"another daemon is serving the admin API at {path}"
    assert not daemon.events("model_loaded") and not daemon.events("worker_spawned")
