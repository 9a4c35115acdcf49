"""The host KV store tier in a live `pagedd serve` with two stories260K workers: the server's workers
share one arena in /dev/shm, prefixes evicted from the pools come back from it (on either worker),
the arena is removed at exit, a killed server's arena is removed at the next start, and a second
server cannot take a store name in use."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import torch

from click.testing import CliRunner

from paged.ops.bench.servers import stop_server
from paged.ops.cli import main as pagedctl
from paged.shared.kv_store_path import store_path
from support.daemon_process import Daemon, scrape, start_daemon

pytestmark = pytest.mark.slow

SYSTEM_PROMPTS = 16  # of 64 tokens: 64 blocks of 16 tokens, against pools of 30 blocks per worker


def serve(tmp_path: Path, stories_dir: Path, store_name: str) -> Daemon:
    tmp_path.mkdir()
    return start_daemon(
        tmp_path, "--model", str(stories_dir), "--device", "cpu", "--workers", "2", "--max-model-len", "256",
        "--kv-cache-memory", "600KiB", "--kv-offload-memory", "4MiB", "--kv-store-name", store_name,
        env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def prompts(turn: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    systems = [[1, *torch.randint(3, 512, (63,), generator=generator).tolist()] for _ in range(SYSTEM_PROMPTS)]
    return [system + [100 + turn, 7, 8] for system in systems]


def complete(url: str, prompt: list[int]) -> list[int]:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def total(metrics: dict[str, float], name: str) -> float:
    return sum(value for key, value in metrics.items() if key.split("{")[0] == name)


def test_a_served_store_serves_evicted_prefixes_and_is_cleaned_up(tmp_path: Path, stories_dir: Path, store_name: str) -> None:
    daemon = serve(tmp_path / "first", stories_dir, store_name)
    try:
        daemon.wait_ready()
        assert store_path(store_name).exists()
        (tmp_path / "second").mkdir()
        second = start_daemon(tmp_path / "second", "--model", str(stories_dir), "--device", "cpu", "--kv-offload-memory", "1MiB", "--kv-store-name", store_name)
        assert second.wait_exit(60) == 1
        assert f"KV store {store_name} is in use by pagedd serve pid {daemon.process.pid}" in second.tail()
        first_turn = [complete(daemon.url, prompt) for prompt in prompts(0)]
        again = [complete(daemon.url, prompt) for prompt in prompts(0)]
        assert again == first_turn  # greedy, whichever tier the prefix came from
        for prompt in prompts(1):
            complete(daemon.url, prompt)
        metrics = scrape(daemon.url)
        assert total(metrics, "paged_kv_store_saves_total") > 0
        assert total(metrics, "paged_kv_store_loads_total") > 0
        for failed in ("paged_kv_store_failed_saves_total", "paged_kv_store_failed_loads_total"):
            assert any(key.startswith(failed) for key in metrics) and total(metrics, failed) == 0
        assert total(metrics, "paged_kv_store_hits_tokens_total") >= SYSTEM_PROMPTS * 64 // 2
        assert len([key for key in metrics if key.startswith("paged_kv_store_slots_total")]) == 1  # one store, two workers
        status = CliRunner().invoke(pagedctl, ["status", "--socket", str(tmp_path / "first" / "admin.sock")])
        assert status.exit_code == 0, status.output
        assert "KV store" in status.output and "loads" in status.output and "prompt tokens loaded from the KV store" in status.output
    finally:
        stop_server(daemon.process)
    assert not store_path(store_name).exists()


def test_a_killed_servers_store_is_removed_at_the_next_start(tmp_path: Path, stories_dir: Path, store_name: str) -> None:
    daemon = serve(tmp_path / "killed", stories_dir, store_name)
    try:
        daemon.wait_ready()
        complete(daemon.url, prompts(0)[0])
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(30)
        assert store_path(store_name).exists()  # nobody removed it
    finally:
        daemon.stop()
    restarted = serve(tmp_path / "restarted", stories_dir, store_name)
    try:
        restarted.wait_ready()
        removed = restarted.events("kv_store_leftover_removed")
        assert [event["path"] for event in removed] == [str(store_path(store_name))]
    finally:
        stop_server(restarted.process)
    assert not store_path(store_name).exists()
