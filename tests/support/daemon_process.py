"""A real `pagedd` daemon as a subprocess for the end-to-end tests (tests/e2e/):
JSON logs in a file, an optional NOTIFY_SOCKET the test listens on (as systemd would), and SSE streaming
helpers. Port, health wait and graceful stop are the benchmark's (ops/bench/servers.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paged.ops.bench.servers import ServerStartError, free_port, stop_server, wait_healthy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0  # model load and worker spawn on a busy 2-core machine


def pagedd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "paged.ops.pagedd", *args]


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic time, KEY=value lines)

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096).decode()
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        self.messages.append((time.monotonic(), message))
        return message

    def wait_for(self, key: str, timeout: float, value: str | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key}{'=' + value if value else ''} within {timeout} s; got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self.socket.close()


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "<not json>", "line": line})
        return events

    def events(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.logs() if event.get("event") == name]

    def wait_for_log(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.events(name):
                return found[-1]
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {name!r} log event; exit={self.process.poll()} log tail:\n{self.tail()}")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        try:
            wait_healthy(self.url, self.process, self.log_path, timeout)
        except ServerStartError as error:
            raise AssertionError(f"{error}\n{self.tail()}") from None

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pagedd still running after {timeout} s:\n{self.tail()}") from None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def start_daemon(
    tmp_path: Path, *serve_args: str, global_args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None,
    new_session: bool = False,
) -> Daemon:
    """`pagedd [global_args] serve --port PORT [serve_args]`, logging JSON to tmp_path/pagedd.log; with
    `new_session`, in a process group of its own (which a test may signal whole)."""
    port = port or free_port()
    log_path = tmp_path / "pagedd.log"
    process_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    process_env["PAGED_ADMIN_SOCKET"] = str(tmp_path / "admin.sock")  # no clash with a daemon already running
    process_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            pagedd_command("--log-json", *global_args, "serve", "--port", str(port), *serve_args),
            cwd=PROJECT_ROOT, env=process_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=new_session,
        )  # fmt: skip
    return Daemon(process, port, log_path)


def stream_completion(url: str, prompt: str, max_tokens: int, timeout: float = 300.0) -> Iterator[dict[str, Any]]:
    """The SSE events of one streaming completion, as parsed JSON, until [DONE]."""
    body = {"model": "paged-builtin", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)


PAGEDD = Path(sys.executable).parent / "pagedd"


def serve_stories(log_dir: Path, model_dir: Path, *extra: str) -> Iterator[Daemon]:
    """`pagedd serve` with stories260K on the CPU for a module's tests, then a graceful stop."""
    if not PAGEDD.exists():
        pytest.fail(f"{PAGEDD} not found: install the project into the venv")
    daemon = start_daemon(log_dir, "--model", str(model_dir), "--device", "cpu", *extra, env={"PYTHONUNBUFFERED": "1"})
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        stop_server(daemon.process)


def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels) -> value."""
    return parse_metrics(httpx.get(f"{url}/metrics").text)


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from the Prometheus text format."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
