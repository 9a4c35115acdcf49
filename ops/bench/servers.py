"""Starts `pagedd serve` as a subprocess for a baseline configuration, waits until /health says ready
(saying what the server is doing meanwhile), and stops it afterwards, so that every system in a comparison
runs the same workload on the same box. The servers run one at a time, so they can all use one port.
The tests start their daemons with the same port, health and stop helpers (tests/support/daemon_process.py)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from rich.console import Console

# Baseline name -> the `pagedd serve` options that make it; "paged" is the system under test, or
# "paged:LAYOUT" once per `--workers-layout` (runner.py). A baseline's options come after
# --server-arg's, so its own setting wins (no-kv-store drops a store the run gave).
SERVER_CONFIGS: dict[str, list[str]] = {
    "paged": [],
    "contiguous": ["--kv-allocator", "contiguous"],
    "no-prefix-caching": ["--no-prefix-caching"],
    "no-kv-store": ["--kv-offload-memory", "0"],
    "lfu": ["--kv-eviction-policy", "lfu", "--kv-store-eviction-policy", "lfu"],
    "depth": ["--kv-eviction-policy", "depth", "--kv-store-eviction-policy", "depth"],
    "greedy-admission": ["--admission-policy", "greedy"],  # paged as before predictive admission
}
STARTUP_TIMEOUT_S = 300.0
PROGRESS_LINE_EVERY_S = 10.0  # without a terminal (a log file, CI), a line this often while a server starts
_PORT_OPTION = re.compile(r"--port(?:=(.*))?$")


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


def split_server_args(server_args: tuple[str, ...]) -> tuple[list[str], int | None]:
    """The --server-arg values as argv (each split like a shell would, so "--max-num-seqs 8" works), with
    any --port taken out: the port is the tool's to give, since it must know where to reach the server."""
    argv = [word for arg in server_args for word in shlex.split(arg)]
    port = None
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        match = _PORT_OPTION.match(word)
        if match is None:
            rest.append(word)
            continue
        value = match.group(1) if match.group(1) is not None else next(words, "")
        if not value.isdigit():
            raise ValueError(f"--server-arg --port needs a port number, got {value!r}")
        port = int(value)
    return rest, port


def last_log_event(log_path: Path) -> str:
    """What a starting server said last: the event of its last JSON log line (else the line itself)."""
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
    if not lines:
        return "starting"
    try:
        return str(json.loads(lines[-1]).get("event", lines[-1]))
    except (json.JSONDecodeError, AttributeError):
        return lines[-1][:100]


def wait_healthy(
    url: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = STARTUP_TIMEOUT_S,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Poll `url`/health until it answers 200, calling `progress(seconds waited)` at each poll;
    ServerStartError if the process exits first or time runs out."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if progress is not None:
            progress(time.monotonic() - started)
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
def running_server(model_dir: Path, system: str, args: list[str], log_dir: Path, port: int | None = None) -> Iterator[str]:
    """Run `pagedd serve` for `system` with `args` on `port` (default: a free one); yields its URL once
    healthy, showing on stderr what the server is doing until then."""
    port = port or free_port()
    command = [sys.executable, "-m", "paged.ops.pagedd", "serve", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{system.replace(':', '-')}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            with _StartProgress(f"pagedd serve ({system}) on port {port}", log_path) as progress:
                wait_healthy(url, process, log_path, progress=progress)
            yield url
        finally:
            stop_server(process)


class _StartProgress:
    """A spinner line on a terminal, or a plain line every PROGRESS_LINE_EVERY_S seconds otherwise:
    how long the server has been starting and what it logged last (loading the model, ...)."""

    def __init__(self, what: str, log_path: Path) -> None:
        self._what = what
        self._log_path = log_path
        self._console = Console(stderr=True)
        self._status = self._console.status(f"starting {what}") if self._console.is_terminal else None
        self._next_line_at = 0.0

    def __enter__(self) -> Callable[[float], None]:
        if self._status is not None:
            self._status.start()
        return self._update

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
        self._console.print(f"{self._what}: {'ready' if exc[0] is None else 'failed'}", highlight=False)

    def _update(self, waited_s: float) -> None:
        message = f"starting {self._what}: {waited_s:.0f} s, last log: {last_log_event(self._log_path)}"
        if self._status is not None:
            self._status.update(message)
        elif waited_s >= self._next_line_at:
            self._console.print(message, highlight=False)
            self._next_line_at = waited_s + PROGRESS_LINE_EVERY_S
