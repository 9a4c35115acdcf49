"""The eviction replay (ops/eviction_bench.py): deterministic, and each policy wins where
docs/kv-store.md says it does."""

from __future__ import annotations

import random

from click.testing import CliRunner

from paged.ops.eviction_bench import WORKLOADS, main, replay


def systems(name: str, num_requests: int = 300) -> list[list[int]]:
    return WORKLOADS[name](random.Random(0), num_requests)


def test_recency_wins_bursts_in_the_pool_alone() -> None:
    lru, lfu = (replay(systems("bursts"), policy, 40, 0, 0.04) for policy in ("lru", "lfu"))
    assert lru.hit_rate > lfu.hit_rate + 0.02


def test_frequency_resists_a_scan_with_the_store() -> None:
    lru, lfu = (replay(systems("hot-and-scan"), policy, 40, 96, 0.04) for policy in ("lru", "lfu"))
    assert lfu.hit_rate > lru.hit_rate + 0.03 and lfu.recompute_cost < lru.recompute_cost


def test_depth_saves_recompute_cost_when_depth_is_dear() -> None:
    lru, depth = (replay(systems("mixed-depth", 600), policy, 40, 96, 0.5) for policy in ("lru", "depth"))
    assert depth.recompute_cost < 0.8 * lru.recompute_cost


def test_the_command_prints_every_workload_and_policy() -> None:
    result = CliRunner().invoke(main, ["--num-requests", "40"])
    assert result.exit_code == 0, result.output
    for name in WORKLOADS:
        assert f"{name}: 40 requests" in result.output
    assert result.output.count(" lfu ") == 3  # a row per table
