"""Start-up of `pagedd serve`: failures give a non-zero exit and one error line saying what and
where, without a traceback; on a terminal the steps read as sentences."""

from __future__ import annotations

import os
import pty
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support.daemon_process import PROJECT_ROOT, Daemon, free_port, pagedd_command, start_daemon

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


def test_on_a_terminal_start_up_says_what_it_is_doing(tmp_path: Path) -> None:
    """stderr on a terminal: the start-up steps as sentences, the gateway's first before any worker's
    (it is printed before the model loads), ending with the URL it serves."""
    port = free_port()
    env = {**os.environ, "PAGED_ADMIN_SOCKET": str(tmp_path / "admin.sock")}
    env.pop("NOTIFY_SOCKET", None)
    lines = read_terminal_until(pagedd_command("serve", "--null-model", "--workers", "2", "--port", str(port)), env, "serving ")
    sentences = [line.split("] ", 1)[1].strip() for line in lines if "] " in line]
    expected = [
        f"starting paged: paged-builtin, 2 workers, HTTP on 127.0.0.1:{port}",
        "worker 0: process started, loading the model…",
        "worker 1: process started, loading the model…",
        "worker 0: loading the null model (no weights) on cpu…",
        "worker 1: loading the null model (no weights) on cpu…",
        "worker 0: ready, waiting for the gateway at ipc://",
        "worker 0: registered: ",
        "workers ready: 2, context window ",
        f"serving paged-builtin on http://127.0.0.1:{port}",
    ]
    assert sentences[0] == expected[0], lines
    for start in expected:
        assert any(sentence.startswith(start) for sentence in sentences), (start, lines)
    ready = next(i for i, sentence in enumerate(sentences) if sentence.startswith(expected[-2]))
    assert sentences[ready + 1 :] and sentences[-1] == expected[-1]
    assert not any("event=" in line or line.startswith("{") for line in lines)


def read_terminal_until(command: list[str], env: dict[str, str], last: str, timeout: float = 120.0) -> list[str]:
    """Run `command` with stdout and stderr on a pseudo-terminal until a line contains `last`; the lines."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    lines: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while not any(last in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, lines
            if select.select([controller], [], [], 1.0)[0]:
                pending += os.read(controller, 65536)
                *complete, pending = pending.split(b"\n")
                lines += [line.decode(errors="replace").rstrip("\r") for line in complete]
    finally:
        process.terminate()
        process.wait(60)
        os.close(controller)
    return lines
