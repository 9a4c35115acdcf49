"""Greedy outputs are the same whether a prefix is recomputed or loaded back from the host KV store,
under every eviction policy: the real model (stories260K) with a pool far smaller than its prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from paged.ops.offline_engine import OfflineEngine
from paged.shared.config import CacheConfig, KVSharingConfig, MiB, ModelConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams

PAGE_BYTES = 5 * 2 * 16 * 4 * 8 * 4  # stories260K, float32, 16-token blocks
POOL_BLOCKS = 20  # 320 tokens: a few requests at a time, while the prompts below need 64 blocks
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def prompts(round_: int) -> list[list[int]]:
    """Eight system prompts of three blocks each, each with a user turn of its round."""
    generator = torch.Generator().manual_seed(5)
    systems = [[1, *torch.randint(3, 512, (47,), generator=generator).tolist()] for _ in range(8)]
    return [system + [100 + round_, *range(200, 209)] for system in systems]


def run(stories_dir: Path, policy: str | None, store_name: str) -> tuple[list[list[list[int]]], int]:
    """Two rounds of the eight prompts: (outputs, tokens loaded from the store). policy None: no store."""
    engine = OfflineEngine(
        ModelConfig(model=str(stories_dir), device="cpu", attention_backend="torch", max_model_len=256),
        CacheConfig(kv_cache_memory=POOL_BLOCKS * PAGE_BYTES, swap_space=0, kv_eviction_policy=policy or "lru", kv_store_eviction_policy=policy or "lru"),
        SchedulerConfig(max_num_batched_tokens=256),
        KVSharingConfig(kv_offload_memory=2 * MiB if policy else 0, kv_store_name=store_name),
    )
    try:
        outputs = engine.generate(prompts(0), GREEDY) + engine.generate(prompts(1), GREEDY)
        stats = engine.scheduler.stats()
        assert stats.used_blocks == 0 and engine.scheduler.audit().ok
        return outputs, stats.store_hits_tokens
    finally:
        engine.close()


def test_greedy_outputs_are_the_same_with_and_without_the_store(stories_dir: Path, store_name: str) -> None:
    recomputed, no_hits = run(stories_dir, None, store_name)
    assert no_hits == 0
    for policy in ("lru", "lfu", "depth"):
        loaded, store_hits = run(stories_dir, policy, f"{store_name}-{policy}")
        assert store_hits >= 8 * 3 * 16 * 3 // 4, policy  # most second-round system prompts came from the store
        assert loaded == recomputed, policy
