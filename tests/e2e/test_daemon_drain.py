"""SIGTERM/SIGINT on a real `pagedd serve` in the middle of streaming requests: the drain lets them
finish (or, past --drain-timeout, ends them with an error event) and the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from paged.gateway.signals import EXIT_NOW_MESSAGE
from support.daemon_process import PROJECT_ROOT, Daemon, NotifySocket, free_port, pagedd_command, start_daemon, stream_completion

pytestmark = pytest.mark.slow

NUM_STREAMS = 10


class Streams:
    """NUM_STREAMS streaming completions in threads, each recording its events."""

    def __init__(self, daemon: Daemon, max_tokens: int) -> None:
        self.events: list[list[dict[str, Any]]] = [[] for _ in range(NUM_STREAMS)]
        self.errors: list[BaseException] = []
        self.started = [threading.Event() for _ in range(NUM_STREAMS)]
        self.threads = [threading.Thread(target=self._run, args=(daemon.url, i, max_tokens)) for i in range(NUM_STREAMS)]
        for thread in self.threads:
            thread.start()

    def _run(self, url: str, index: int, max_tokens: int) -> None:
        try:
            for event in stream_completion(url, f"Once upon a time {index}", max_tokens):
                self.events[index].append(event)
                self.started[index].set()
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
            self.started[index].set()

    def wait_started(self, timeout: float = 120.0) -> None:
        for started in self.started:
            assert started.wait(timeout), "a stream sent no event"
        assert not self.errors, self.errors

    def join(self, timeout: float = 240.0, expect_errors: bool = False) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a stream did not end"
        assert expect_errors or not self.errors, self.errors

    def finish_reasons(self) -> list[str | None]:
        return [next((e["choices"][0]["finish_reason"] for e in events if e.get("choices") and e["choices"][0].get("finish_reason")), None) for events in self.events]


@contextmanager
def streaming_daemon(tmp_path: Path, drain_timeout: str, max_tokens: int, env: dict[str, str] | None = None) -> Iterator[tuple[Daemon, Streams]]:
    """A daemon serving NUM_STREAMS started streams; killed afterwards if the test left it running."""
    daemon = start_daemon(tmp_path, "--drain-timeout", drain_timeout, env=env)
    try:
        daemon.wait_ready()
        streams = Streams(daemon, max_tokens=max_tokens)
        streams.wait_started()
        yield daemon, streams
    finally:
        daemon.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_running_streams_finish(tmp_path: Path, signum: signal.Signals) -> None:
    with streaming_daemon(tmp_path, "300", max_tokens=500) as (daemon, streams):
        daemon.process.send_signal(signum)
        daemon.wait_for_log("engine_draining")
        # Draining: new requests are refused with 503, /health says so.
        refused = httpx.post(f"{daemon.url}/v1/completions", json={"model": "paged-builtin", "prompt": "hi", "max_tokens": 2}, timeout=30)
        health = httpx.get(f"{daemon.url}/health", timeout=30)
        streams.join()
        assert daemon.wait_exit() == 0, daemon.tail()
    assert refused.status_code == 503, refused.text
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert streams.finish_reasons() == ["length"] * NUM_STREAMS
    for events in streams.events:
        assert not any("error" in event for event in events)
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events if e.get("choices")) > 0
    assert daemon.events("drained") and not daemon.events("drain_timed_out")


def test_a_stop_signal_to_the_whole_process_group_replaces_no_worker(tmp_path: Path) -> None:
    """`kill -TERM -- -PGID` (a supervisor that signals the group) ends the workers with the gateway:
    the gateway drains and exits without spawning a worker that would load the model only to exit."""
    daemon = start_daemon(tmp_path, new_session=True)
    try:
        daemon.wait_ready()
        os.killpg(daemon.process.pid, signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.tail()
    finally:
        daemon.stop()
    assert len(daemon.events("model_loading")) == len(daemon.events("worker_spawned")), daemon.tail()


def test_drain_timeout_ends_unfinished_streams_with_an_error_event(tmp_path: Path) -> None:
    with streaming_daemon(tmp_path, "1", max_tokens=2000) as (daemon, streams):
        daemon.process.send_signal(signal.SIGTERM)
        streams.join()
        assert daemon.wait_exit() == 0, daemon.tail()
    timed_out = daemon.events("drain_timed_out")
    assert len(timed_out) == 1 and timed_out[0]["aborted"] == NUM_STREAMS
    for events in streams.events:
        error = events[-1].get("error")
        assert error is not None, events[-3:]
        assert "did not finish within the drain timeout of 1 s" in error["message"]


def test_second_stop_signal_exits_at_once(tmp_path: Path) -> None:
    """Each stream still gets an error event that says why; the runtime directory the forced exit
    leaves behind is removed by the next start, as is the one a SIGKILL leaves."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {"XDG_RUNTIME_DIR": str(run_dir)}
    with streaming_daemon(tmp_path, "300", max_tokens=2000, env=env) as (daemon, streams):
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for_log("engine_draining")
        daemon.process.send_signal(signal.SIGTERM)
        status = daemon.wait_exit(timeout=60)
        streams.join(expect_errors=True)  # the connections drop after the error event
    assert status == 1
    assert daemon.events("exiting_now")[0]["requests_aborted"] == NUM_STREAMS
    assert not daemon.events("drained")
    for events in streams.events:
        assert EXIT_NOW_MESSAGE in events[-1]["error"]["message"], events[-3:]
    wait_gone(worker_pids(daemon))
    (left,) = run_dir.glob("paged-*")

    for left_by in ("second-sigterm", "sigkill"):
        (log_dir := tmp_path / f"after-{left_by}").mkdir()
        next_daemon = start_daemon(log_dir, "--null-model", env=env)
        try:
            next_daemon.wait_ready()
            assert [event["path"] for event in next_daemon.events("stale_runtime_dir_removed")] == [str(left)]
            assert not left.exists()
            (left,) = run_dir.glob("paged-*")  # the new daemon's own
        finally:
            next_daemon.process.kill()  # SIGKILL: its directory stays too
            next_daemon.wait_exit()
        wait_gone(worker_pids(next_daemon))


def worker_pids(daemon: Daemon) -> list[int]:
    return [event["pid"] for event in daemon.events("worker_registered")]


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and "Z" != Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} still running"
        time.sleep(0.1)


def test_stop_signal_while_waiting_for_workers_exits_cleanly(tmp_path: Path) -> None:
    """`pagedd gateway` whose worker never comes: SIGTERM ends the wait, exit 0."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "PAGED_ADMIN_SOCKET": str(tmp_path / "admin.sock")}
    command = pagedd_command("--log-json", "gateway", "--worker", f"ipc://{tmp_path / 'absent.sock'}", "--port", str(free_port()))
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert notify.wait_for("STATUS", 120)["STATUS"] == "starting: waiting for 1 worker to register"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
    assert process.returncode == 0, output.decode()
    assert b"startup_failed" not in output
