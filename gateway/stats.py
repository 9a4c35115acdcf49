"""Point-in-time statistics of one worker's page pool and scheduler: the ONE snapshot that /metrics,
the admin API, `pagedctl status` and the simulator read.

Each layer adds the figures it owns to its base, and builds its snapshot from the base's with
`extend` instead of copying fields one by one: the allocator's `PoolStats`, the scheduler's
`SchedulerStats` (queues and counters), the engine's `WorkerStats` (which worker, in what state).
The encoded form is flat, so a JSON reader sees every figure at the top level.
"""

from __future__ import annotations

import bisect
from typing import Any, TypeVar

import msgspec

S = TypeVar("S", bound="PoolStats")


class PoolStats(msgspec.Struct, kw_only=True):
    """The page pool, as the block allocator sees it."""

    num_blocks: int = 0
    block_size: int = 0
    free_blocks: int = 0  # neither held nor holding cached content
    cached_blocks: int = 0  # free but holding reusable cached content (kept for prefix hits until evicted)
    used_blocks: int = 0  # held by live requests
    shared_blocks: int = 0  # held by more than one block table
    slots_reserved: int = 0  # token slots in held blocks
    slots_filled: int = 0  # of those, slots holding tokens
    evictions: int = 0  # cached blocks whose content was dropped for reuse (counter)
    refetched_blocks: int = 0  # of those, blocks whose content an admission needed again soon after (counter)
    host_blocks: int = 0  # the host pool for swapped-out blocks
    host_free_blocks: int = 0
    kv_utilization: float = 0.0  # slots_filled / slots_reserved (0 when nothing is reserved); derived

    def __post_init__(self) -> None:
        self.kv_utilization = self.slots_filled / self.slots_reserved if self.slots_reserved else 0.0


class SchedulerStats(PoolStats, kw_only=True):
    """The pool plus the scheduler's queues and counters."""

    running_seqs: int = 0  # sequences in the running batch (an n > 1 request counts n times)
    running_requests: int = 0
    waiting_requests: int = 0  # waiting for admission, including ones preempted by recompute
    swapped_requests: int = 0
    prefix_queries_tokens: int = 0  # counters from here on: monotonically increasing
    prefix_hits_tokens: int = 0  # from either tier of the prefix cache
    store_hits_tokens: int = 0  # of those, loaded from the host KV store
    store_misses_tokens: int = 0  # tokens of full prompt blocks in neither tier (with a KV store)
    preemptions: int = 0
    block_waits: int = 0  # steps a running sequence waited for a free block instead of preempting
    swaps_out: int = 0  # blocks copied device -> host
    swaps_in: int = 0  # blocks copied host -> device
    kv_transfers_in_flight: int = 0  # KV hand-offs this worker sends or receives now (docs/disaggregation.md)
    computed_tokens: int = 0  # tokens the worker was asked to compute (prefix-cache hits are not)
    recomputed_tokens: int = 0  # of those, computed again after a recompute preemption
    # Over the thrash detector's sliding window (gateway/thrash_detector.py), `window_s` long:
    window_s: float = 0.0
    goodput: float = 1.0  # share of computed tokens computed for the first time
    preemptions_per_s: float = 0.0
    evictions_per_s: float = 0.0  # cached blocks evicted for reuse
    refetch_share: float = 0.0  # evicted cached blocks whose content was needed again / evicted
    window_prefix_hit_rate: float = 0.0  # prefix-cache hits / queries, in tokens
    kv_thrashing: bool = False  # the pool thrashes: admission is tightened until it clears
    # Predictive admission (gateway/admission.py):
    admission_margin: float = 0.0  # standard deviations of forecast error kept free
    expected_output_share: float = 1.0  # learned mean share of max_tokens that sequences generate
    prefix_hit_rate: float = 0.0  # prefix_hits_tokens / prefix_queries_tokens; derived

    def __post_init__(self) -> None:
        PoolStats.__post_init__(self)
        queries = self.prefix_queries_tokens
        self.prefix_hit_rate = self.prefix_hits_tokens / queries if queries else 0.0


class WorkerStats(SchedulerStats, kw_only=True):
    """One worker of the engine: who it is and its scheduler's snapshot (zeros while it registers)."""

    name: str
    state: str  # "ready", "disconnected" (link down, not yet declared lost) or "registering"
    endpoint: str
    role: str = "mixed"  # prefill, decode or mixed (docs/disaggregation.md)
    steps: int = 0  # steps completed since it (re)registered

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class Histogram(msgspec.Struct):
    """Observations counted into buckets the Prometheus way, kept where prometheus-client may not be
    imported (the scheduling core); /metrics exposes it as a histogram family."""

    bounds: tuple[float, ...]
    counts: list[int] = []  # per bucket (value <= bound), then one for values beyond the last bound
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)


# Seconds a hand-off takes after the first token (the prefill worker's output of the step that
# started the send) until a done: milliseconds for small pages on one host, up to seconds for large
# models' pages across hosts.
TRANSFER_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TransferStats(msgspec.Struct, kw_only=True):
    """KV hand-offs from prefill to decode workers (gateway/handoff.py), over the gateway's life."""

    in_flight: int = 0
    started: int = 0  # counters from here on
    completed: int = 0  # the decode worker took the request over
    cancelled: int = 0  # its request ended first (stop at the first token, abort, error)
    failures: dict[str, int] = {}  # by kind: failed (an end reported it), prefill_lost, decode_lost
    blocks: int = 0  # blocks sent by completed transfers
    bytes: int = 0  # their bytes (the workers' page size)
    blocks_skipped: int = 0  # prompt blocks the decode worker had cached, not sent
    # Completed transfers: from the first token (the send started) to the done.
    latency: Histogram = msgspec.field(default_factory=lambda: Histogram(TRANSFER_LATENCY_BUCKETS))


def extend(base: PoolStats, cls: type[S], **more: Any) -> S:
    """`cls`'s snapshot from its base's figures plus the ones `cls` adds (derived figures are recomputed)."""
    return cls(**{**msgspec.structs.asdict(base), **more})


class SchedulerCounters(msgspec.Struct):
    """The scheduler's running totals, kept by the parts that count them (admission, preemption):
    each is the SchedulerStats figure of the same name."""

    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    store_hits_tokens: int = 0
    store_misses_tokens: int = 0
    computed_tokens: int = 0  # tokens the worker was asked to compute (prefix-cache hits are not computed)
    recomputed_tokens: int = 0  # of which computed again after a recompute preemption
    preemptions: int = 0
    block_waits: int = 0
    swaps_out: int = 0
    swaps_in: int = 0


# Seconds a step spends saving to or loading from the KV store: a 20 KiB page takes microseconds,
# a batch of 2 MiB pages milliseconds.
STORE_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


class KVStoreStats(msgspec.Struct, kw_only=True):
    """One host KV store, as its gateway index sees it (shared by the workers that attached it)."""

    store_id: str
    policy: str  # its eviction policy
    num_slots: int
    page_bytes: int  # bytes of one slot (0: the workers did not say)
    free_slots: int
    saving_slots: int  # a save was ordered, its step has not come back: not loadable yet
    ready_slots: int  # loadable; of these, pinned ones have loads in flight
    pinned_slots: int
    quarantined_slots: int  # saves in flight on a lost worker: unusable until it is known to be done
    saves: int = 0  # counters from here on; saves and loads that ran (their step came back)
    loads: int = 0
    failed_saves: int = 0  # ordered, never confirmed: their step's page moves failed, or the worker was lost
    failed_loads: int = 0
    evictions: int = 0  # ready entries dropped for a new save
    dropped_saves: int = 0  # evicted pool blocks not saved: every slot was saving or pinned
    save_seconds: Histogram = msgspec.field(default_factory=lambda: Histogram(STORE_SECONDS_BUCKETS))  # per step with saves
    load_seconds: Histogram = msgspec.field(default_factory=lambda: Histogram(STORE_SECONDS_BUCKETS))  # per step with loads
    bytes_used: int = 0  # derived: slots not free × page_bytes

    def __post_init__(self) -> None:
        self.bytes_used = (self.num_slots - self.free_slots) * self.page_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.page_bytes
