"""Which eviction policy wins on which traffic: replays synthetic prefix-cache workloads through the
real scheduler, block pool and KV store index against a simulated worker (no model, no timing
noise), once per policy, with and without a host KV store. Prints numbers; asserts nothing.

    python -m paged.ops.eviction_bench [--store-slots 96] [--pool-blocks 40] [--context-cost 0.04]

Requests run one at a time, so every figure comes from the caches alone. Per workload and policy
(the same one for the pool and the store): the prefix hit rate in prompt tokens with the pool only,
with the store (and the store's share of it), and the recompute cost left with the store: the sum,
over the full prompt blocks found in neither tier, of 1 + context_cost·depth, relative to computing
every prompt block (the cost the depth policy weighs; docs/kv-store.md).

Workloads (block size 16, each prompt a system prompt plus a short user turn):
- bursts: system prompts come in bursts that overlap, and rarely return once their burst is over;
- hot-and-scan: four hot system prompts, interleaved with one-off long documents (a scan);
- mixed-depth: many short (2 blocks) and a few long (24 blocks) system prompts, asked uniformly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table

from paged.gateway.kv_store_index import KVStoreIndexes
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, EvictionPolicyName, SchedulerConfig
from paged.shared.sampling_params import SamplingParams

BLOCK_SIZE = 16
POLICIES: tuple[EvictionPolicyName, ...] = ("lru", "lfu", "depth")
USER_TOKENS = 5  # a user turn shorter than a block: only system prompt blocks can hit
OUTPUT_TOKENS = 2


def _prompt(rng: random.Random, num_blocks: int) -> list[int]:
    return [rng.randrange(3, 30000) for _ in range(num_blocks * BLOCK_SIZE)]


def bursts(rng: random.Random, num_requests: int) -> list[list[int]]:
    """Each system prompt is asked in a burst of 6 while the next two bursts start; 5% of asks
    go back to a random earlier one. Recency predicts reuse."""
    systems = [_prompt(rng, 8) for _ in range(num_requests // 4 + 3)]
    asks: list[list[int]] = []
    for index in range(len(systems) - 2):
        for _ in range(2):
            window = systems[index : index + 3]
            asks += [rng.choice(window) if rng.random() > 0.05 else rng.choice(systems[: index + 1]) for _ in range(3)]
    return asks[:num_requests]


def hot_and_scan(rng: random.Random, num_requests: int) -> list[list[int]]:
    """Half the asks are one of four hot system prompts; the rest are long documents asked once."""
    hot = [_prompt(rng, 8) for _ in range(4)]
    return [rng.choice(hot) if rng.random() < 0.5 else _prompt(rng, 24) for _ in range(num_requests)]


def mixed_depth(rng: random.Random, num_requests: int) -> list[list[int]]:
    """Forty-eight short system prompts (2 blocks) and four long ones (24 blocks), asked uniformly:
    96 blocks each way, more than the caches hold together."""
    systems = [_prompt(rng, 2) for _ in range(48)] + [_prompt(rng, 24) for _ in range(4)]
    return [rng.choice(systems) for _ in range(num_requests)]


WORKLOADS: dict[str, Callable[[random.Random, int], list[list[int]]]] = {
    "bursts": bursts,
    "hot-and-scan": hot_and_scan,
    "mixed-depth": mixed_depth,
}


@dataclass
class Replay:
    prompt_tokens: int = 0  # in full blocks of system prompts
    hit_tokens: int = 0
    store_hit_tokens: int = 0
    recompute_cost: float = 0.0
    full_cost: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def replay(systems: list[list[int]], policy: EvictionPolicyName, pool_blocks: int, store_slots: int, context_cost: float) -> Replay:
    """Serve each prompt alone, in order; what the caches served and what was left to recompute."""
    cache = CacheConfig(block_size=BLOCK_SIZE, kv_eviction_policy=policy, kv_store_eviction_policy=policy)
    store = KVStoreIndexes(policy).for_store("bench", store_slots, context_cost=context_cost) if store_slots else None
    scheduler = Scheduler(SchedulerConfig(kv_watermark=0.0), cache, pool_blocks, 4096, store_index=store, context_cost=context_cost)
    arena: list[list[int | None]] = [[None] * BLOCK_SIZE for _ in range(store_slots)]
    loop = StepLoop(scheduler, SimulatedWorker(pool_blocks, BLOCK_SIZE, store=arena), overlapped=False)
    result = Replay()
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    for number, system in enumerate(systems):
        before = scheduler.stats()
        user = [1, 2, number % 1000 + 3, 4, 5][:USER_TOKENS]
        scheduler.add_request(Request(f"r{number}", system + user, params, eos_token_ids=frozenset()))
        loop.run()
        after = scheduler.stats()
        hits = after.prefix_hits_tokens - before.prefix_hits_tokens
        blocks = len(system) // BLOCK_SIZE
        result.prompt_tokens += blocks * BLOCK_SIZE
        result.hit_tokens += hits
        result.store_hit_tokens += after.store_hits_tokens - before.store_hits_tokens
        costs = [1.0 + context_cost * depth for depth in range(blocks)]
        result.full_cost += sum(costs)
        result.recompute_cost += sum(costs[hits // BLOCK_SIZE :])  # a chain hits a prefix: the rest is recomputed
    return result


@click.command()
@click.option("--num-requests", default=600, show_default=True)
@click.option("--pool-blocks", default=40, show_default=True, help="Blocks of the KV pool (one request of the longest prompt takes 26).")
@click.option("--store-slots", default=96, show_default=True, help="Slots of the host KV store.")
@click.option("--context-cost", default=0.04, show_default=True, help="The depth policy's slope (stories260K: 0.04 per block of 16).")
@click.option("--seed", default=0, show_default=True)
def main(num_requests: int, pool_blocks: int, store_slots: int, context_cost: float, seed: int) -> None:
    """Prefix hit rates and recompute cost per eviction policy on three synthetic workloads."""
    console = Console()
    for name, make in WORKLOADS.items():
        systems = make(random.Random(seed), num_requests)
        table = Table(title=f"{name}: {len(systems)} requests, pool {pool_blocks} blocks, store {store_slots} slots")
        for header in ("policy", "hit rate, pool only", "hit rate, with store", "of which store", "recompute cost left"):
            table.add_column(header, justify="right")
        for policy in POLICIES:
            alone = replay(systems, policy, pool_blocks, 0, context_cost)
            tiered = replay(systems, policy, pool_blocks, store_slots, context_cost)
            table.add_row(
                policy, f"{alone.hit_rate:.1%}", f"{tiered.hit_rate:.1%}",
                f"{tiered.store_hit_tokens / max(tiered.prompt_tokens, 1):.1%}", f"{tiered.recompute_cost / tiered.full_cost:.1%}",
            )  # fmt: skip
        console.print(table)


if __name__ == "__main__":
    main()
