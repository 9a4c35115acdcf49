"""What one scheduler counts and learns over its whole life, and the statistics snapshot it reports.

When a worker is lost, its scheduler starts its allocator, queues and step parts afresh
(Scheduler.take_all_requests; the server makes a new Scheduler for the worker's next session and
hands it these figures, gateway/supervisor.py); these carry on: the running totals (`SchedulerCounters`, kept by
the parts that count), the output lengths predictive admission learns (output_lengths.py), the
admission margin (admission.py) and the thrash detector's sliding window (thrash_detector.py), which
the scheduler samples every step. `snapshot` assembles the `SchedulerStats` (stats.py) that
/metrics, the admin API, `pagedctl status` and the simulator read.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import numpy as np

from paged.gateway.admission import AdmissionMargin
from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.output_lengths import OutputLengthModel, used_shares
from paged.gateway.policy_queues import PolicyQueues
from paged.gateway.request import Sequence
from paged.gateway.stats import PoolStats, SchedulerCounters, SchedulerStats, extend
from paged.gateway.thrash_detector import ThrashDetector, WorkTotals
from paged.shared.config import SchedulerConfig
from paged.shared.logging import get_logger

log = get_logger("gateway.scheduler")  # its events are the scheduler's


class SchedulerFigures:
    def __init__(self, worker_name: str, clock: Callable[[], float]) -> None:
        self.worker_name = worker_name  # the replica its thrash events name
        self.counters = SchedulerCounters()
        self.lengths = OutputLengthModel()
        self.margin = AdmissionMargin()
        self.thrash = ThrashDetector(clock)
        # The evictions (and refetched blocks) of allocators dropped with their lost workers.
        self._evictions_before = 0
        self._refetched_before = 0

    def allocator_dropped(self, pool: PoolStats) -> None:
        """The allocator whose final figures these are is replaced (its worker was lost)."""
        self._evictions_before += pool.evictions
        self._refetched_before += pool.refetched_blocks

    def _work_totals(self, pool: PoolStats) -> WorkTotals:
        counters = self.counters
        return WorkTotals(
            computed_tokens=counters.computed_tokens,
            recomputed_tokens=counters.recomputed_tokens,
            preemptions=counters.preemptions,
            evictions=self._evictions_before + pool.evictions,
            refetched_blocks=self._refetched_before + pool.refetched_blocks,
            prefix_queries_tokens=counters.prefix_queries_tokens,
            prefix_hits_tokens=counters.prefix_hits_tokens,
        )

    def watch_thrashing(self, allocator: BlockAllocator, queues: PolicyQueues, config: SchedulerConfig) -> None:
        """Sample the work totals into the thrash detector (a clock read unless a sample is due), and
        log when the pool starts or stops thrashing."""
        thrash = self.thrash
        if not thrash.sample_due():
            return
        change = thrash.observe(self._work_totals(allocator.stats()), config)
        if change is None:
            return
        window = thrash.figures
        event = "kv_thrashing" if change else "kv_thrashing_cleared"
        (log.warning if change else log.info)(
            event,
            worker=self.worker_name,
            window_s=round(window.seconds, 2),
            recompute_share=round(window.recompute_share, 4),
            recomputed_tokens=window.recomputed_tokens,
            computed_tokens=window.computed_tokens,
            preemptions_per_s=round(window.preemptions_per_s, 2),
            evictions_per_s=round(window.evictions_per_s, 2),
            refetch_share=round(window.refetch_share, 4),
            prefix_hit_rate=round(window.prefix_hit_rate, 4),
            running_seqs=len(queues.running),
            waiting_requests=len(queues.waiting),
        )

    def snapshot(self, pool: PoolStats, queues: PolicyQueues, kv_transfers_in_flight: int) -> SchedulerStats:
        """The pool's figures plus the queues, the counters, the window's and what admission learned."""
        window = self.thrash.figures
        lengths = self.lengths
        share = lengths.mean_share(_running_shares(queues.running) if lengths.needs_refresh() else None)
        return extend(
            pool,
            SchedulerStats,
            **msgspec.structs.asdict(self.counters),
            evictions=self._evictions_before + pool.evictions,
            refetched_blocks=self._refetched_before + pool.refetched_blocks,
            running_seqs=len(queues.running),
            running_requests=queues.num_running_requests,
            waiting_requests=len(queues.waiting),
            swapped_requests=len(queues.swapped),
            kv_transfers_in_flight=kv_transfers_in_flight,
            window_s=window.seconds,
            goodput=window.goodput,
            preemptions_per_s=window.preemptions_per_s,
            evictions_per_s=window.evictions_per_s,
            refetch_share=window.refetch_share,
            window_prefix_hit_rate=window.prefix_hit_rate,
            kv_thrashing=self.thrash.thrashing,
            admission_margin=self.margin.z,
            expected_output_share=1.0 if share is None else share,
        )


def _running_shares(running: list[Sequence]) -> np.ndarray:
    return used_shares(
        (seq.num_tokens - seq.request.num_prompt_tokens for seq in running),
        (seq.max_num_tokens - seq.request.num_prompt_tokens for seq in running),
    )
