"""SIGHUP on a real `pagedd --config FILE serve`: the reloadable subset of the file (log level,
admission caps, scheduling policy) applies to the running daemon, without dropping a request."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from paged.gateway.engine_client import AdmissionError, Refusal
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams
from support.daemon_process import free_port, start_daemon, stream_completion



def _complete(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "paged-builtin", "prompt": "hi", "max_tokens": 2}, timeout=60)


@pytest.mark.slow
def test_sighup_reloads_log_level_and_admission_caps_without_dropping_requests(tmp_path: Path) -> None:
    config = tmp_path / "paged.toml"
    # The file's port loses to the --port flag start_daemon passes; its scheduling_policy to the flag below.
    config.write_text(f'log_level = "warning"\nport = {free_port()}\nscheduling_policy = "prefill-first"\n')
    daemon = start_daemon(tmp_path, "--scheduling-policy", "priority", global_args=("--config", str(config)))
    try:
        daemon.wait_ready()
        assert _complete(daemon.url).status_code == 200
        assert not [e for e in daemon.logs() if e.get("level") == "info"]  # the file's warning level holds

        events: list[dict[str, Any]] = []
        streaming = threading.Event()

        def stream_one() -> None:
            for event in stream_completion(daemon.url, "Once upon a time", 400):
                events.append(event)
                streaming.set()

        stream = threading.Thread(target=stream_one)
        stream.start()
        assert streaming.wait(120)
        config.write_text('log_level = "info"\nscheduling_policy = "prefill-first"\n[serve]\nmax_waiting_requests = 0\n')
        daemon.process.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_for_log("config_reloaded")
        assert reloaded["changes"] == {"log_level": "info", "max_waiting_requests": 0}  # the policy stays the flag's

        refused = _complete(daemon.url)  # a waiting queue of 0 admits nothing
        assert refused.status_code == 429, refused.text
        assert daemon.events("request.received")  # logged at info, now shown
        stream.join(240)
        assert not stream.is_alive()
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # admitted before the reload: kept

        config.write_text('log_level = "loud"\n')
        daemon.process.send_signal(signal.SIGHUP)
        failed = daemon.wait_for_log("config_reload_failed")
        assert "log_level: invalid enum value 'loud'" in failed["error"]
        assert httpx.get(f"{daemon.url}/health", timeout=30).status_code == 200

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.stop()


@pytest.mark.slow
def test_sighup_without_a_config_file_changes_nothing(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--null-model")
    try:
        daemon.wait_ready()
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("reload_ignored")["reason"] == "no --config file to re-read"
        assert httpx.get(f"{daemon.url}/health", timeout=30).status_code == 200
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.stop()


def _waiting_scheduler(policy: str) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(scheduling_policy=policy), CacheConfig(block_size=4), num_blocks=64, max_model_len=128)  # type: ignore[arg-type]
    for request_id, priority in (("low", 5), ("high", -5), ("mid", 0)):
        params = SamplingParams(max_tokens=4)
        scheduler.add_request(Request(request_id, [3, 4, 5], params, eos_token_ids=frozenset({2}), priority=priority))
    return scheduler


def test_reconfigure_to_and_from_the_priority_policy_reorders_the_waiting_queue() -> None:
    scheduler = _waiting_scheduler("decode-first")
    assert [r.request_id for r in scheduler.waiting] == ["low", "high", "mid"]  # arrival order
    scheduler.reconfigure(SchedulerConfig(scheduling_policy="priority", max_waiting_requests=3))
    assert [r.request_id for r in scheduler.waiting] == ["high", "mid", "low"]
    with pytest.raises(AdmissionError) as refused:
        scheduler.add_request(Request("late", [3], SamplingParams(max_tokens=4), eos_token_ids=frozenset({2})))
    assert refused.value.kind is Refusal.QUEUE_FULL  # the new cap applies
    scheduler.reconfigure(SchedulerConfig(scheduling_policy="prefill-first"))
    assert [r.request_id for r in scheduler.waiting] == ["low", "high", "mid"]
