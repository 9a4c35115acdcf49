"""An AsyncEngine over real worker processes in a given workers layout (shared/workers_layout.py),
as `pagedd serve --workers-layout` builds it, and helpers to stream requests through it and check
that nothing is left behind."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine import AsyncEngine
from paged.shared.config import CacheConfig, MiB, ModelConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams
from support.engine_processes import EOS, running_engine


def layout_engine(
    layout: str,
    model_config: ModelConfig | None = None,
    *,
    null_model: bool = False,
    kv_cache_memory: int = 16 * MiB,
    scheduler_config: SchedulerConfig | None = None,
) -> AbstractAsyncContextManager[AsyncEngine]:
    """The workers of `layout`, running the real model on the CPU unless asked for the null one."""
    return running_engine(
        layout=layout, model_config=model_config or ModelConfig(device="cpu"), null_model=null_model,
        cache_config=CacheConfig(kv_cache_memory=kv_cache_memory, swap_space=0), scheduler_config=scheduler_config,
    )  # fmt: skip


async def stream(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> tuple[dict[int, list[int]], str | None]:
    """Every choice's tokens, and the error the stream ended with (None: it finished)."""
    tokens: dict[int, list[int]] = {}
    error = None
    async for output in engine.generate(request_id, prompt, params, eos_token_ids=EOS):
        error = output.error or error
        for delta in output.deltas:
            tokens.setdefault(delta.index, []).extend(delta.token_ids)
    return tokens, error


def assert_nothing_held(engine: AsyncEngine) -> None:
    """No block held on any worker, every scheduler's and the hand-off's accounting sound."""
    assert engine.handoff.num_in_flight == 0
    assert_block_accounting(engine.handoff)
    for replica in engine.replicas:
        assert replica.scheduler is not None, f"worker {replica.name} is not registered"
        assert_block_accounting(replica.scheduler)
        assert replica.scheduler.stats().used_blocks == 0, f"worker {replica.name} holds blocks"
