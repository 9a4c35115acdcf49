"""Samples the server's Prometheus /metrics during a run: KV utilization over time, peak running
sequences and the share of samples in which the pool thrashed from the gauges; prefix-cache hit
rate, preemptions, block waits, recomputed tokens (and their share of computed tokens) and KV hand-offs between
prefill and decode workers from counter deltas over this run (the counters are cumulative since the
server started, so only differences describe the run)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Counters read at the start and the end of a run.
COUNTERS = (
    "paged_prefix_cache_queries_tokens_total", "paged_prefix_cache_hits_tokens_total", "paged_preemptions_total",
    "paged_block_waits_total", "paged_kv_store_hits_tokens_total",
    "paged_kv_transfers_completed_total", "paged_kv_transfer_seconds_sum",
    "paged_computed_tokens_total", "paged_recomputed_tokens_total",
)  # fmt: skip


@dataclass
class ServerStats:
    """The server's figures of a run, each under the name it has in the results (results.summarize
    takes them whole; ops/bench/report.py's FIGURES says which ones the table shows)."""

    kv_utilization_mean: float | None = None
    kv_utilization_peak: float | None = None
    kv_memory_used_peak: float | None = None  # peak fraction of KV blocks held by live requests
    peak_concurrency: int | None = None  # most sequences running at once
    prefix_hit_rate: float | None = None  # prompt tokens served by either tier of the prefix cache
    store_hit_rate: float | None = None  # of which by the host KV store (its share of all prompt tokens)
    preemptions: int | None = None
    block_waits: int | None = None  # steps running sequences waited for a free block instead of preempting
    kv_transfers: int | None = None  # hand-offs from prefill to decode workers completed
    kv_transfer_mean_ms: float | None = None  # their mean latency (None without any)
    recomputed_tokens: int | None = None
    recompute_share: float | None = None  # recomputed / computed tokens
    thrashing_share: float | None = None  # share of samples with paged_kv_thrashing at 1 on some worker
    # [seconds from start, KV utilization, fraction of blocks used, running, waiting, thrashing] per sample
    kv_timeline: list[list[float]] = field(default_factory=list)


def parse_metrics(text: str) -> dict[str, list[float]]:
    """Sample name -> its values, one per label set (one per worker for the per-worker gauges)."""
    values: dict[str, list[float]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name].append(sample.value)
    return values


def _total(values: dict[str, list[float]], name: str) -> float:
    return sum(values.get(name, []))


def pool_tokens(url: str) -> int | None:
    """Token slots of the server's KV pools (every worker's), from its /metrics; None if it does not say."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
        response.raise_for_status()
        values = parse_metrics(response.text)
    except (httpx.HTTPError, ValueError):
        return None
    blocks, sizes = values.get("paged_kv_blocks_total", []), values.get("paged_kv_block_size", [])
    if not blocks or len(blocks) != len(sizes):
        return None
    return int(sum(count * size for count, size in zip(blocks, sizes, strict=True)))


class MetricsSampler:
    """Polls /metrics every `interval` seconds while the run lasts; `stop()` returns the run's figures."""

    def __init__(self, client: httpx.AsyncClient, url: str, interval: float = 0.25) -> None:
        self._client, self._url, self._interval = client, f"{url}/metrics", interval
        self._timeline: list[list[float]] = []
        self._first: dict[str, list[float]] | None = None
        self._start = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    async def _scrape(self) -> dict[str, list[float]] | None:
        try:
            response = await self._client.get(self._url, timeout=5)
            response.raise_for_status()
            return parse_metrics(response.text)
        except (httpx.HTTPError, ValueError):
            return None  # a server without /metrics: the server-side figures stay None

    def _record(self, values: dict[str, list[float]]) -> None:
        utilization = values.get("paged_kv_utilization", [])
        blocks_total = _total(values, "paged_kv_blocks_total")
        self._timeline.append([
            round(time.perf_counter() - self._start, 3),
            sum(utilization) / len(utilization) if utilization else 0.0,  # mean over workers
            _total(values, "paged_kv_blocks_used") / blocks_total if blocks_total else 0.0,
            _total(values, "paged_requests_running"),
            _total(values, "paged_requests_waiting"),
            max(values.get("paged_kv_thrashing", [0.0]), default=0.0),
        ])

    async def _poll(self) -> None:
        while True:
            values = await self._scrape()
            if values is not None:
                self._record(values)
            await asyncio.sleep(self._interval)

    async def start(self) -> None:
        self._first = await self._scrape()
        self._start = time.perf_counter()
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> ServerStats:
        if self._task:
            self._task.cancel()
        last = await self._scrape()
        if self._first is None or last is None:
            return ServerStats()
        self._record(last)
        delta = {name: _total(last, name) - _total(self._first, name) for name in COUNTERS}
        queries = delta["paged_prefix_cache_queries_tokens_total"]
        transfers = delta["paged_kv_transfers_completed_total"]
        computed = delta["paged_computed_tokens_total"]
        recomputed = delta["paged_recomputed_tokens_total"]
        # Mean while serving: idle samples (nothing running) would only measure the gaps between arrivals.
        busy = [sample for sample in self._timeline if sample[3] > 0] or self._timeline
        utilization = [sample[1] for sample in busy]
        return ServerStats(
            kv_utilization_mean=sum(utilization) / len(utilization),
            kv_utilization_peak=max(utilization),
            kv_memory_used_peak=max(sample[2] for sample in self._timeline),
            peak_concurrency=int(max(sample[3] for sample in self._timeline)),
            prefix_hit_rate=delta["paged_prefix_cache_hits_tokens_total"] / queries if queries else 0.0,
            store_hit_rate=delta["paged_kv_store_hits_tokens_total"] / queries if queries else 0.0,
            preemptions=int(delta["paged_preemptions_total"]),
            block_waits=int(delta["paged_block_waits_total"]),
            kv_transfers=int(transfers),
            kv_transfer_mean_ms=delta["paged_kv_transfer_seconds_sum"] / transfers * 1e3 if transfers else None,
            recomputed_tokens=int(recomputed),
            recompute_share=recomputed / computed if computed else 0.0,
            thrashing_share=sum(sample[5] > 0 for sample in busy) / len(busy),
            kv_timeline=self._timeline,
        )
