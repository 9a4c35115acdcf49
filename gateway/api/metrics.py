"""Prometheus metrics: per-worker scheduler and page-pool state read from the engine at each
scrape (and summed per worker role), the KV hand-offs between prefill and decode workers, per-store
KV store state, plus per-request counters and latency histograms recorded by the HTTP layer.

The engine's figures are exported one way each: a gauge or counter is a row (name, help, field of
the snapshot) in one of the tables below, and `_families` turns a table into one family per row
with a sample per snapshot (worker, role, store); histograms are `stats.Histogram`s, exported by
`_histograms`. Only the two figures kept as dicts (hand-off failures by reason, store slots by
state) have a family of their own.

Every app gets its own registry, so several apps (tests) never share or clash over metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from paged.gateway.engine_client import EngineClient
from paged.gateway.stats import KVStoreStats, TransferStats, WorkerStats
from paged.gateway.stats import Histogram as HistogramCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; spans a tiny CPU model's milliseconds up to long generations on a loaded server.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# (name, help, field of the snapshot); counters get `_total` appended on the wire by prometheus-client.
Figure = tuple[str, str, str]
# Per worker (label `worker`): WorkerStats fields.
WORKER_GAUGES = (
    ("paged_worker_ready", "1 when the worker is registered and ready", "ready"),
    ("paged_requests_running", "Requests with sequences in the running batch", "running_requests"),
    ("paged_requests_waiting", "Requests waiting to be scheduled", "waiting_requests"),
    ("paged_kv_blocks_total", "KV cache blocks in the pool", "num_blocks"),
    ("paged_kv_block_size", "Tokens per KV cache block", "block_size"),
    ("paged_kv_blocks_used", "KV cache blocks held by live requests", "used_blocks"),
    ("paged_kv_blocks_free", "KV cache blocks neither held nor cached", "free_blocks"),
    ("paged_kv_blocks_cached", "Unreferenced KV cache blocks kept for prefix-cache hits", "cached_blocks"),
    ("paged_kv_utilization", "Token slots holding tokens / token slots reserved", "kv_utilization"),
    # Over the thrash detector's sliding window (--thrash-window seconds):
    ("paged_kv_thrashing", "1 while the pool thrashes (recompute or refetch share at its threshold)", "kv_thrashing"),
    ("paged_goodput_ratio", "Share of computed tokens computed for the first time, over the window", "goodput"),
    ("paged_preemptions_per_second", "Preemptions per second, over the window", "preemptions_per_s"),
    ("paged_evictions_per_second", "Cached blocks evicted for reuse per second, over the window", "evictions_per_s"),
    ("paged_refetch_ratio", "Evicted cached blocks whose content was needed again / evicted, over the window", "refetch_share"),
    ("paged_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up, over the window", "window_prefix_hit_rate"),
    ("paged_admission_margin", "Standard deviations of forecast error predictive admission keeps free", "admission_margin"),
    ("paged_expected_output_share", "Learned mean share of max_tokens that sequences generate", "expected_output_share"),
)
WORKER_COUNTERS = (
    ("paged_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache", "prefix_queries_tokens"),
    ("paged_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache", "prefix_hits_tokens"),
    ("paged_preemptions", "Requests preempted (all sequences of an n > 1 request at once: one preemption)", "preemptions"),
    ("paged_block_waits", "Steps a running sequence waited for a free block instead of preempting", "block_waits"),
    ("paged_evictions", "Cached blocks evicted for reuse", "evictions"),
    ("paged_refetched_blocks", "Evicted cached blocks whose content an admission needed again soon after", "refetched_blocks"),
    ("paged_swaps_out", "Blocks swapped out to host memory", "swaps_out"),
    ("paged_swaps_in", "Blocks swapped back in from host memory", "swaps_in"),
    ("paged_kv_store_hits_tokens", "Prompt tokens loaded from the host KV store (of the prefix-cache hits)", "store_hits_tokens"),
    ("paged_kv_store_misses_tokens", "Prompt tokens of full blocks in neither the pool nor the KV store (with a store)", "store_misses_tokens"),
    ("paged_computed_tokens", "Tokens the worker computed (prefix-cache hits are not computed)", "computed_tokens"),
    ("paged_recomputed_tokens", "Tokens computed again after a recompute preemption", "recomputed_tokens"),
)
# Per host KV store (label `store`, its id): KVStoreStats fields.
STORE_GAUGES = (
    ("paged_kv_store_slots_total", "Slots of the host KV store", "num_slots"),
    ("paged_kv_store_bytes", "Bytes of the host KV store's slots in use", "bytes_used"),
    ("paged_kv_store_capacity_bytes", "Bytes of the host KV store's slots", "capacity_bytes"),
)
STORE_SLOT_STATES = ("free", "saving", "ready", "pinned", "quarantined")
STORE_COUNTERS = (
    ("paged_kv_store_saves", "Blocks saved to the host KV store as the pool evicted them (saves that ran)", "saves"),
    ("paged_kv_store_loads", "Blocks loaded from the host KV store for prefix hits (loads that ran)", "loads"),
    ("paged_kv_store_failed_saves", "KV store saves never confirmed: their step's page moves failed or their worker was lost", "failed_saves"),
    ("paged_kv_store_failed_loads", "KV store loads never confirmed: their step's page moves failed or their worker was lost", "failed_loads"),
    ("paged_kv_store_evictions", "KV store entries dropped for new saves", "evictions"),
    ("paged_kv_store_dropped_saves", "Evicted blocks not saved because every store slot was busy", "dropped_saves"),
)
STORE_HISTOGRAMS = (
    ("paged_kv_store_save_seconds", "Worker time per step saving pages to the KV store", "save_seconds"),
    ("paged_kv_store_load_seconds", "Worker time per step loading pages from the KV store", "load_seconds"),
)


# Per role (label `role`: prefill, decode, mixed): WorkerStats fields summed over the role's workers,
# the load the router and the hand-off balance.
ROLE_GAUGES = (
    ("paged_role_workers", "Ready workers per role", "ready"),
    ("paged_role_requests_running", "Requests with sequences in the running batch, summed over the workers of a role", "running_requests"),
    ("paged_role_requests_waiting", "Requests waiting to be scheduled, summed over the workers of a role", "waiting_requests"),
    ("paged_role_kv_blocks_used", "KV cache blocks held, summed over the workers of a role", "used_blocks"),
    ("paged_role_kv_blocks_total", "KV cache blocks, summed over the workers of a role", "num_blocks"),
)
# The KV hand-offs (no label): TransferStats fields.
TRANSFER_GAUGES = (("paged_kv_transfers_in_flight", "KV hand-offs in flight", "in_flight"),)
TRANSFER_COUNTERS = (
    ("paged_kv_transfers_started", "KV hand-offs from a prefill to a decode worker started", "started"),
    ("paged_kv_transfers_completed", "KV hand-offs completed: the decode worker took the request over", "completed"),
    ("paged_kv_transfers_cancelled", "KV hand-offs cancelled because their request ended first", "cancelled"),
    ("paged_kv_transfer_blocks", "KV blocks sent by completed hand-offs", "blocks"),
    ("paged_kv_transfer_bytes", "Bytes of KV sent by completed hand-offs", "bytes"),
    ("paged_kv_transfer_blocks_skipped", "Prompt blocks not sent because the decode worker had them cached", "blocks_skipped"),
)
TRANSFER_HISTOGRAMS = (
    ("paged_kv_transfer_seconds", "KV hand-off latency: from the first token (the send has started) to the first done", "latency"),
)


class WorkerCollector(Collector):
    """Reads engine.worker_stats() at scrape time: the engine stays the only source of truth."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        workers = self._engine.worker_stats()
        by_worker = [([worker.name], worker) for worker in workers]
        yield from _families(GaugeMetricFamily, WORKER_GAUGES, ["worker"], by_worker)
        yield from _families(CounterMetricFamily, WORKER_COUNTERS, ["worker"], by_worker)
        roles = sorted({worker.role for worker in workers})
        by_role = [([role], [worker for worker in workers if worker.role == role]) for role in roles]
        yield from _families(GaugeMetricFamily, ROLE_GAUGES, ["role"], by_role, read=_role_total)
        yield from _transfer_families(self._engine.transfer_stats())
        yield from _store_families(self._engine.store_stats())


Rows = Sequence[tuple[list[str], Any]]  # (label values, the snapshot they label)


def _families(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    figures: Sequence[Figure],
    labels: list[str],
    rows: Rows,
    read: Callable[[Any, str], float] = getattr,
) -> Iterator[Metric]:
    """One family per figure, with a sample per row (`read` takes the figure's field of a row's snapshot)."""
    for name, help_text, field in figures:
        family = kind(name, help_text, labels=labels)
        for values, snapshot in rows:
            family.add_metric(values, float(read(snapshot, field)))
        yield family


def _histograms(figures: Sequence[Figure], labels: list[str], rows: Rows) -> Iterator[Metric]:
    """One histogram family per figure (a stats.Histogram field), with a sample per row."""
    for name, help_text, field in figures:
        family = HistogramMetricFamily(name, help_text, labels=labels)
        for values, snapshot in rows:
            counts: HistogramCounts = getattr(snapshot, field)
            family.add_metric(values, _cumulative_buckets(counts), counts.sum)
        yield family


def _role_total(workers: list[WorkerStats], field: str) -> float:
    return float(sum(getattr(worker, field) for worker in workers))


def _transfer_families(stats: TransferStats) -> Iterator[Metric]:
    rows = [([], stats)]
    yield from _families(GaugeMetricFamily, TRANSFER_GAUGES, [], rows)
    yield from _families(CounterMetricFamily, TRANSFER_COUNTERS, [], rows)
    failures = CounterMetricFamily(
        "paged_kv_transfer_failures", "KV hand-offs given up, by reason: failed (a worker reported it), prefill_lost, decode_lost", labels=["reason"]
    )
    for reason, count in sorted(stats.failures.items()):
        failures.add_metric([reason], count)
    yield failures
    yield from _histograms(TRANSFER_HISTOGRAMS, [], rows)


def _store_families(stores: list[KVStoreStats]) -> Iterator[Metric]:
    if not stores:
        return
    rows = [([store.store_id], store) for store in stores]
    yield from _families(GaugeMetricFamily, STORE_GAUGES, ["store"], rows)
    slots = GaugeMetricFamily("paged_kv_store_slots", "KV store slots by state (pinned: ready ones a load reads)", labels=["store", "state"])
    for store in stores:
        for state in STORE_SLOT_STATES:
            slots.add_metric([store.store_id, state], float(getattr(store, f"{state}_slots")))
    yield slots
    yield from _families(CounterMetricFamily, STORE_COUNTERS, ["store"], rows)
    yield from _histograms(STORE_HISTOGRAMS, ["store"], rows)


def _cumulative_buckets(counts: HistogramCounts) -> list[tuple[str, float]]:
    buckets = []
    total = 0
    for bound, count in zip([*map(str, counts.bounds), "+Inf"], counts.counts, strict=True):
        total += count
        buckets.append((bound, float(total)))
    return buckets


class Metrics:
    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(WorkerCollector(engine))
        r = self.registry
        self.requests_finished = Counter(
            "paged_requests_finished", "Finished sequences by reason (stop, length, abort, error)", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("paged_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("paged_generation_tokens", "Generated tokens", registry=r)
        self.time_to_first_token = Histogram(
            "paged_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "paged_time_per_output_token_seconds", "Mean time between a request's output tokens after the first",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.e2e_latency = Histogram(
            "paged_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "paged_request_queue_time_seconds", "Arrival to first scheduling", buckets=LATENCY_BUCKETS, registry=r
        )

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)
