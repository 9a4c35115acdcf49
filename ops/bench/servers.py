"""Starts `pagedd serve` as a subprocess for a baseline configuration, waits until /health says ready,
and stops it afterwards, so that every system in a comparison runs the same workload on the same box.
The tests start their daemons with the same port, health and stop helpers (tests/support/daemon_process.py)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

# Baseline name -> the `pagedd serve` options that make it; "paged" is the system under test.
SERVER_CONFIGS: dict[str, list[str]] = {
    "paged": [],
    "contiguous": ["--kv-allocator", "contiguous"],
    "no-prefix-caching": ["--no-prefix-caching"],
}
STARTUP_TIMEOUT_S = 300.0


class ServerStartError(RuntimeError):
    """`pagedd serve` exited or never became healthy; the message names its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _failure_line(log_path: Path) -> str:
    """The exception that stopped the server (its traceback's last line), else the log's last line."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (exceptions or lines or ["no output"])[-1]


def wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll `url`/health until it answers 200; ServerStartError if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"pagedd serve exited with {process.returncode}: {_failure_line(log_path)} (log: {log_path})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"pagedd serve not healthy after {timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, so the server drains and takes its workers down; SIGKILL if it has not exited in 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_server(model_dir: Path, config: str, extra_args: list[str], log_dir: Path) -> Iterator[str]:
    """Run `pagedd serve` with the baseline's options plus `extra_args`; yields its URL."""
    port = free_port()
    command = [sys.executable, "-c", "from paged.ops.pagedd import main; main()", "serve", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), *SERVER_CONFIGS[config], *extra_args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{config}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, log_path)
            yield url
        finally:
            stop_server(process)
