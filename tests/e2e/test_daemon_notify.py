"""sd_notify: the messages systemd would get on its NOTIFY_SOCKET, from a real `pagedd serve`,
a real `pagedd worker`, and from the notifier itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from paged.gateway.service_state import ping_watchdog
from paged.shared.systemd_notify import SystemdNotifier
from support.daemon_process import PROJECT_ROOT, START_TIMEOUT_S, NotifySocket, pagedd_command, start_daemon

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


@pytest.mark.slow
def test_gateway_reports_starting_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    daemon = start_daemon(tmp_path, "--null-model", "--workers", "2", env=env)
    try:
        starting = notify.wait_for("STATUS", START_TIMEOUT_S)
        assert starting == {"STATUS": "starting: waiting for 2 workers to register"}
        ready = notify.wait_for("READY", START_TIMEOUT_S, "1")
        assert ready["STATUS"] == "serving 2 workers"
        # READY=1 comes after the workers registered and once the port listens: /health answers ready.
        health = httpx.get(f"{daemon.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        registered = daemon.events("worker_registered")
        assert len(registered) == 2
        pings = [notify.wait_for("WATCHDOG", 30, "1") for _ in range(3)]
        assert all(ping == {"WATCHDOG": "1"} for ping in pings)
        daemon.process.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", 60, "1")
        assert stopping["STATUS"].startswith("draining")
        assert daemon.wait_exit() == 0
        # The spawned workers did not inherit NOTIFY_SOCKET: only the gateway spoke, READY=1 once.
        assert sum(message.get("READY") == "1" for _, message in notify.messages) == 1
    finally:
        daemon.stop()
        notify.close()


@pytest.mark.slow
def test_worker_reports_ready_after_model_load_and_bind(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    endpoint = f"ipc://{tmp_path / 'paged.worker.sock'}"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    log_path = tmp_path / "paged.worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            pagedd_command("--log-json", "worker", "--endpoint", endpoint, "--null-model", "--worker-id", "w0"),
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        ready = notify.wait_for("READY", START_TIMEOUT_S, "1")
        assert ready["STATUS"] == f"model null loaded on cpu, listening on {endpoint}"
        assert (tmp_path / "paged.worker.sock").exists()  # bound before READY=1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        notify.close()


def test_notifier_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = SystemdNotifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("serving")
    notifier.watchdog()


def test_notifier_takes_its_variables_out_of_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environment()
    assert notifier.watchdog_interval == 15.0
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    notifier.close()


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SystemdNotifier.from_environment()
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"paged-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = SystemdNotifier("@" + name)
        notifier.status("draining: 3 requests running")
        assert listener.recv(4096) == b"STATUS=draining: 3 requests running"
        notifier.close()


def test_a_reader_that_falls_behind_never_blocks_the_sender(tmp_path: Path) -> None:
    """The datagram queue fills when nobody reads: messages are dropped, the loop goes on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify.sock"))
        notifier = SystemdNotifier(str(tmp_path / "notify.sock"))
        for _ in range(10_000):  # a blocking send would hang here (pytest-timeout fails the test)
            notifier.watchdog()
        notifier.close()


async def test_watchdog_pings_come_from_the_event_loop(tmp_path: Path) -> None:
    """While the loop hangs no ping goes out, which is what lets systemd restart a hung gateway."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify.sock"))
        listener.setblocking(False)
        notifier = SystemdNotifier(str(tmp_path / "notify.sock"), watchdog_usec=100_000)  # a ping every 0.05 s

        def received() -> int:
            count = 0
            with contextlib.suppress(BlockingIOError):
                while listener.recv(64) == b"WATCHDOG=1":
                    count += 1
            return count

        pinging = asyncio.create_task(ping_watchdog(notifier))
        await asyncio.sleep(0.3)
        assert received() >= 1
        time.sleep(0.5)  # the event loop hangs
        assert received() == 0
        await asyncio.sleep(0.3)
        assert received() >= 1
        pinging.cancel()
        notifier.close()
