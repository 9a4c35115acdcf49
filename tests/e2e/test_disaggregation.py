"""Prefill/decode disaggregation end to end: the gateway's engine over real worker processes laid out
as `pagedd serve --workers-layout 1p1d` starts them, real models, KV pages over the ipc transport.

Greedy (and seeded) outputs are the same as with two mixed workers; a worker killed -9 while a
transfer is in flight leaves no request hanging and no block held on either side; `pagedd serve
--workers-layout` reports the roles and the transfers in /metrics and `pagedctl status`."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from paged.ops.bench.servers import stop_server
from paged.ops.cli import main as pagedctl
from paged.shared.config import ModelConfig
from paged.shared.sampling_params import SamplingParams
from support.daemon_process import scrape, start_daemon, stream_completion
from support.engine_processes import wait_for
from support.layout_engine import assert_nothing_held, layout_engine, stream

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompt_of(length: int, seed: int) -> list[int]:
    return [1, *((seed * 31 + 7 * i) % 250 + 3 for i in range(length - 1))]  # within every test model's vocabulary


async def run_all(layout: str, model: Path, waves: list[list[tuple[list[int], SamplingParams]]]) -> list[dict[int, list[int]]]:
    """Each wave's requests at once, the waves one after the other; every choice's tokens in order."""
    outputs = []
    async with layout_engine(layout, ModelConfig(model=str(model), device="cpu")) as engine:
        for wave_index, wave in enumerate(waves):
            results = await asyncio.gather(*(stream(engine, f"w{wave_index}r{i}", p, params) for i, (p, params) in enumerate(wave)))
            assert all(error is None for _, error in results)
            outputs += [tokens for tokens, _ in results]
        stats = engine.transfer_stats()
        await wait_for(lambda: all(r.scheduler is not None and r.scheduler.stats().used_blocks == 0 for r in engine.replicas), timeout=30)
        assert_nothing_held(engine)
        page_bytes = engine.replicas[0].page_bytes
    if layout == "1p1d":
        assert stats.completed == sum(map(len, waves)) and not stats.failures, stats
        assert stats.bytes == stats.blocks * page_bytes > 0
        assert stats.blocks_skipped >= 3  # the last wave's prompt starts with three blocks the decode worker has
    return outputs


async def test_outputs_are_the_same_with_one_prefill_and_one_decode_worker_as_with_two_mixed(stories_dir: Path) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=20, n=2, ignore_eos=True)
    waves = [
        [
            (prompt_of(5, 1), GREEDY),
            (prompt_of(32, 2), GREEDY),  # block-aligned
            (prompt_of(70, 3), GREEDY),
            (prompt_of(201, 4), GREEDY),
            (prompt_of(90, 6), seeded),
        ],
        [(prompt_of(201, 4)[:48] + prompt_of(30, 5), GREEDY)],
    ]
    assert await run_all("1p1d", stories_dir, waves) == await run_all("2", stories_dir, waves)


@pytest.mark.parametrize("victim", ["prefill", "decode"])
async def test_a_worker_killed_mid_transfer_leaves_no_hung_request_and_no_held_block(victim: str) -> None:
    """The built-in model (2048-token window): a 1200-token prompt's last chunk takes the prefill
    worker tens of milliseconds, the window in which the transfer is in flight when the kill lands."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    async with layout_engine("1p1d") as engine:
        prefill, decode = engine.replicas
        target = prefill if victim == "prefill" else decode
        pid = target.link.process.pid  # type: ignore[union-attr]
        killed = asyncio.Event()

        async def kill_when_a_transfer_is_in_flight() -> None:
            while engine.handoff.num_in_flight == 0:
                await asyncio.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            killed.set()

        killer = asyncio.create_task(kill_when_a_transfer_is_in_flight())
        results = await asyncio.wait_for(
            asyncio.gather(*(stream(engine, f"r{i}", prompt_of(1200 + 37 * i, i), params) for i in range(3))), 120
        )
        await killer
        assert killed.is_set()
        for tokens, error in results:
            assert error is None and len(tokens[0]) >= 16
        stats = engine.transfer_stats()
        lost = "prefill_lost" if victim == "prefill" else "decode_lost"
        assert stats.failures.get(lost, 0) + stats.failures.get("failed", 0) >= 1, stats
        await wait_for(lambda: target.ready, timeout=60)  # respawned, empty
        await wait_for(lambda: all(r.scheduler is not None and r.scheduler.stats().used_blocks == 0 for r in engine.replicas), timeout=30)
        assert_nothing_held(engine)
        # And the pair works again.
        tokens, error = await stream(engine, "after", prompt_of(300, 9), params)
        assert error is None and len(tokens[0]) == 16


def test_pagedd_serve_with_a_workers_layout_hands_requests_off_and_reports_it(tmp_path: Path) -> None:
    """`pagedd serve --workers-layout 1p1d` (built-in model): a streamed completion is prefilled on
    worker 0 and decoded on worker 1; /metrics and `pagedctl status` show the roles and the transfer."""
    daemon = start_daemon(tmp_path, "--device", "cpu", "--workers-layout", "1p1d", "--kv-cache-memory", "8MiB", "--swap-space", "0")
    try:
        daemon.wait_ready()
        events = list(stream_completion(daemon.url, "Once upon a time " * 20, 12))
        assert sum(len(choice["text"]) > 0 for event in events for choice in event["choices"]) >= 1
        metrics = scrape(daemon.url)
        assert metrics["paged_kv_transfers_completed_total"] == 1 and metrics["paged_kv_transfer_blocks_total"] >= 1
        assert metrics["paged_role_workers{role=prefill}"] == metrics["paged_role_workers{role=decode}"] == 1
        assert metrics["paged_kv_transfer_seconds_count"] == 1
        status = CliRunner().invoke(pagedctl, ["status", "--socket", str(tmp_path / "admin.sock")])
        assert status.exit_code == 0, status.output
        text = " ".join(status.output.split())
        assert "prefill" in text and "decode" in text and "KV transfers: 0 in flight · 1 done" in text, status.output
    finally:
        stop_server(daemon.process)
