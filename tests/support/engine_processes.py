"""An AsyncEngine over real worker processes (null model unless asked) for the process tests
(tests/e2e/), helpers to drive it (one request's result, the blocks in use, waiting), and a worker
started alone (`paged-worker`, split mode)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from paged.gateway.engine import AsyncEngine
from paged.gateway.worker_processes import RuntimeDir, local_workers
from paged.shared.config import MiB, CacheConfig, ModelConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams
from paged.shared.workers_layout import parse_workers_layout

EOS = frozenset({2})
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def running_engine(
    num_workers: int = 1,
    *,
    layout: str | None = None,
    null_step_s: float = 0.0,
    model_config: ModelConfig | None = None,
    cache_config: CacheConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
    null_model: bool = True,
) -> AsyncIterator[AsyncEngine]:
    """`num_workers` mixed workers, or the workers of `layout` (shared/workers_layout.py, as
    `pagedd serve --workers-layout` builds them)."""
    runtime = RuntimeDir()
    cache_config = cache_config or CacheConfig(kv_cache_memory=64 * MiB, swap_space=0)
    scheduler_config = scheduler_config or SchedulerConfig()
    specs = local_workers(
        runtime, model_config or ModelConfig(), cache_config, scheduler_config.max_num_batched_tokens,
        num_workers=None if layout else num_workers, null_model=null_model, log_level="warning", log_json=False,
        null_step_s=null_step_s, roles=parse_workers_layout(layout) if layout else None,
    )  # fmt: skip
    engine = AsyncEngine(specs, scheduler_config, cache_config, registration_timeout=120)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()
        runtime.close()


async def generate(engine: AsyncEngine, request_id: str, prompt: list[int], max_tokens: int, **params: object) -> tuple[list[int], str | None, str | None]:
    """(tokens, finish_reason, error) of one request."""
    tokens: list[int] = []
    finish = error = None
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)  # type: ignore[arg-type]
    async for output in engine.generate(request_id, prompt, sampling, eos_token_ids=EOS):
        error = output.error or error
        for delta in output.deltas:
            tokens += delta.token_ids
            finish = delta.finish_reason or finish
    return tokens, finish, error


def used_blocks(engine: AsyncEngine) -> dict[str, int]:
    return {m.name: m.used_blocks for m in engine.worker_stats() if m.ready}


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def start_split_worker(endpoint: str, *extra: str) -> subprocess.Popen[bytes]:
    """`paged-worker` (the worker's own program; `pagedd worker` is tested in test_daemon_notify.py)."""
    command = [sys.executable, "-m", "paged.worker.cli", "--log-json", "--endpoint", endpoint, "--null-model", *extra]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, stderr=subprocess.DEVNULL)
