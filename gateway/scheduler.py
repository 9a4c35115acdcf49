"""Iteration-level scheduler of one worker: requests in, a StepInput per step out, the step's
results back in as RequestOutputs.

It owns the requests and composes the parts, one job each:
- admission.py: whether a request may enter (refusal kinds), may take running seats, and (under
  predictive admission) is expected to fit the pool for its whole run: demand_forecast.py over
  the output lengths learned from finished sequences (output_lengths.py);
- policy_queues.py: the waiting, swapped and running queues in the policy's order;
- step_planner.py: each step's decisions: token budget, swap-in, admission, preemption
  (preemption.py chooses the victim and swaps or recomputes it);
- sequence_groups.py: n > 1 requests: fork, shared prompt after a recompute, seats;
- step_builder.py: the StepInput deltas, the mirror of what the worker holds, placeholders and
  result fencing;
- output_processor.py: results applied in step order, the stop check, prefix-cache registration;
- stats.py: the snapshot read by metrics, the admin API and the simulator;
- transfer_items.py: the KV transfer items of its next step; a `HandoffHooks` (gateway/handoff.py)
  moves requests between prefill and decode workers through the methods at the end of this class;
- thrash_detector.py: recompute share, preemption and eviction rates over a sliding window; while
  the pool thrashes, admission tightens.
The block allocator (block_allocator.py: paged or contiguous) holds the block tables; with a host
KV store (docs/kv-store.md), a KVStoreSession (kv_store_session.py) orders the step's saves to and
loads from it, over the store's index that every worker of the host shares (kv_store_index.py).

Overlapped scheduling: the caller may schedule() step N+1 before update() for step N (the step
pipeline, gateway/step_pipeline.py, keeps N steps in flight); results must come back in step order.

Progress: add_request refuses a request whose peak, running alone, exceeds the pool, and a
recomputed n > 1 request shares its prompt blocks again, so it never needs more than that peak.
Preemption victims are the latest arrivals, so the oldest running request can always take the
whole pool and finish: admitted work finishes, it is never stuck waiting or preempting itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from paged.gateway.admission import AdmissionMargin, PredictiveAdmission, check_arrival
from paged.gateway.block_accounting import AccountingReport
from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.contiguous_allocator import ContiguousAllocator
from paged.gateway.demand_forecast import DemandForecast
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.kv_store_index import KVStoreIndex
from paged.gateway.kv_store_session import KVStoreSession
from paged.gateway.output_lengths import OutputLengthModel
from paged.gateway.output_processor import OutputProcessor
from paged.gateway.outputs import RequestOutput
from paged.gateway.policy_queues import PolicyQueues, request_order
from paged.gateway.preemption import Preemption
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.gateway.sequence_groups import SequenceGroups, fork_again_if_nothing_sampled, reset_for_recompute
from paged.gateway.stats import SchedulerCounters, SchedulerStats, extend
from paged.gateway.step_builder import StepBuilder, WorkerMirror, is_empty
from paged.gateway.step_planner import StepPlanner
from paged.gateway.transfer_items import TransferItems
from paged.gateway.thrash_detector import ThrashDetector, WorkTotals
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.logging import get_logger
from paged.shared.protocol import StepInput, StepOutput

log = get_logger("gateway.scheduler")

RUNNING = SequenceStatus.RUNNING
FINISHED = SequenceStatus.FINISHED
TRANSFERRING = SequenceStatus.TRANSFERRING


class HandoffHooks(Protocol):
    """What moves requests from prefill to decode workers (gateway/handoff.py) hears of a scheduler."""

    def plan(self, scheduler: Scheduler, step: StepBuilder) -> None:
        """A step is being built: hand off the requests whose first token it samples."""
        ...

    def after_update(self, scheduler: Scheduler, step: StepInput, output: StepOutput) -> None:
        """A step's results were applied (its transfer outcomes are in `output`)."""
        ...

    def request_ended(self, scheduler: Scheduler, request: Request) -> None:
        """A request left this scheduler finished (stop, abort, error)."""
        ...


def uses_kv_store(cache_config: CacheConfig) -> bool:
    """Only the paged allocator's prefix cache has a tier a KV store can back."""
    return cache_config.kv_allocator == "paged" and cache_config.enable_prefix_caching


def make_allocator(
    cache_config: CacheConfig,
    num_blocks: int,
    num_host_blocks: int,
    store: KVStoreSession | None = None,
    context_cost: float = 0.0,
) -> BlockAllocator:
    """The configured allocator; only the paged one has a prefix cache, so only it uses a KV store."""
    if cache_config.kv_allocator == "contiguous":
        return ContiguousAllocator(num_blocks, cache_config.block_size)
    return KVCacheManager(
        num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, num_host_blocks,
        eviction_policy=cache_config.kv_eviction_policy, context_cost=context_cost, store=store,
    )  # fmt: skip


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        num_host_blocks: int = 0,
        *,
        store_index: KVStoreIndex | None = None,
        worker_name: str = "0",
        context_cost: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`store_index`: the host KV store this worker attached (None: none); `worker_name` names the
        replica to it; `context_cost` weighs depth in the depth eviction policy (from the registration)."""
        self.config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self.name = worker_name  # the worker's replica: its log events and its KV store session name it
        self.counters = SchedulerCounters()
        self._num_blocks = num_blocks
        self._num_host_blocks = num_host_blocks
        self._store_index = store_index if uses_kv_store(cache_config) else None
        self._context_cost = context_cost
        self.handoff: HandoffHooks | None = None
        # What is learned outlives a lost worker: output lengths, the admission margin, the window.
        self.lengths = OutputLengthModel()
        self.margin = AdmissionMargin()
        self.thrash = ThrashDetector(clock)
        self._start_empty()

    def _start_empty(self) -> None:
        """Fresh parts: an empty allocator, queues and worker mirror (the counters carry on)."""
        index = self._store_index
        self.store = KVStoreSession(index, self.name) if index is not None else None
        self.kv = make_allocator(self.cache_config, self._num_blocks, self._num_host_blocks, self.store, self._context_cost)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._seqs: dict[int, Sequence] = {}  # live sequences by id
        self.queues = PolicyQueues(self.config.scheduling_policy == "priority")
        self.groups = SequenceGroups(self.kv, self.queues)
        self.mirror = WorkerMirror()
        preemption = Preemption(self.kv, self.queues, self.groups, self.mirror, self.counters)
        watermark_blocks = int(self.config.kv_watermark * self._num_blocks)
        self.predictive = PredictiveAdmission(self.kv, DemandForecast(self.lengths, self.kv.block_size), self.margin)
        self.planner = StepPlanner(
            self.kv, self.queues, self.groups, preemption, self.counters, watermark_blocks, self.predictive
        )
        self.processor = OutputProcessor(self._seqs, self._end_seq, self._finish_request)
        self.transfers = TransferItems()

    # Requests in and out ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or refuse it (AdmissionError: too large to ever fit, or the queue is full)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        queues = self.queues
        max_num_tokens = check_arrival(
            request, self.config, self.kv, self.max_model_len, len(queues.waiting), queues.waiting_tokens
        )
        queues.stamp_arrival(request)
        for seq in request.seqs:
            seq.max_num_tokens = max_num_tokens
            seq.ignore_results_until = -1
        self.requests[request.request_id] = request
        for seq in request.live_seqs():
            self._seqs[seq.seq_id] = seq
        queues.push_waiting(request)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its blocks now; the next step tells the worker."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish_request(request, "abort")
        return True

    def fail_sequences(self, errors: dict[int, str]) -> list[RequestOutput]:
        """End the request of each sequence with that sequence's error now, as a worker's SeqError
        would (its blocks freed, the worker told next step). One output per failed request."""
        outputs: dict[str, RequestOutput] = {}
        for seq_id, message in errors.items():
            seq = self._seqs.get(seq_id)
            if seq is not None and seq.request.request_id not in outputs:
                outputs[seq.request.request_id] = self.processor.fail(seq.request, message)
        return list(outputs.values())

    def _finish_request(self, request: Request, reason: str) -> None:
        """End every sequence of a request that has not ended (abort or error)."""
        live = request.live_seqs()
        was = live[0].status if live else FINISHED
        for seq in request.seqs:
            if seq.status is not FINISHED:
                self._finish_seq(seq, reason)
        if was is RUNNING:
            self.queues.drop_finished_running()
            self.groups.stop_awaiting(request)
        self._forget_request(request, was)

    def _end_seq(self, seq: Sequence, reason: str) -> SequenceStatus:
        """A sequence stopped (output processing); its request ends with its last sequence."""
        was = seq.status
        prompt_len = seq.request.num_prompt_tokens
        self.lengths.observe(seq.num_output_tokens, seq.max_num_tokens - prompt_len)
        self._finish_seq(seq, reason)
        if seq.request.finished:
            self._forget_request(seq.request, was)
        return was

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        seq.status = FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)
        self._seqs.pop(seq.seq_id, None)
        self.mirror.drop(seq)

    def _forget_request(self, request: Request, was: SequenceStatus) -> None:
        """Drop a request that has ended; `was` is the state of its sequences before the end."""
        self.requests.pop(request.request_id, None)
        self.queues.remove(request, was)
        if self.handoff is not None:
            self.handoff.request_ended(self, request)

    def reconfigure(self, scheduler_config: SchedulerConfig) -> None:
        """Apply a reloaded configuration (SIGHUP) to a running scheduler: the admission caps and
        policies, the thrash detector's settings. Queued requests stay; a switch to or from the
        priority policy re-orders them."""
        self.config = scheduler_config
        self.queues.set_policy(scheduler_config.scheduling_policy == "priority")

    def take_all_requests(self) -> list[Request]:
        """The worker is gone: hand back every unfinished request, reset to be recomputed elsewhere,
        and start over with an empty block allocator (the cached content died with the worker)."""
        requests = sorted(self.requests.values(), key=request_order)
        for request in requests:
            for seq in request.live_seqs():
                reset_for_recompute(seq)
                seq.ignore_results_until = -1
            fork_again_if_nothing_sampled(request)
        self.groups.forget_all()
        pool = self.kv.stats()
        self.counters.evictions_before += pool.evictions
        self.counters.refetched_before += pool.refetched_blocks
        if self.store is not None:
            self.store.lost()
        self._start_empty()
        return requests

    def prefix_match_tokens(self, token_ids: list[int], cache_salt: str | None) -> int:
        return self.kv.match_prefix(token_ids, cache_salt)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def needs_step(self) -> bool:
        """Unfinished requests, frees the worker has not been told about yet, or KV transfer items
        to send or to poll for."""
        return bool(self.requests) or self.mirror.has_news or self.transfers.has_news

    @property
    def running(self) -> list[Sequence]:
        return self.queues.running

    @property
    def waiting(self) -> list[Request]:
        return self.queues.waiting

    @property
    def swapped(self) -> list[Request]:
        return self.queues.swapped

    @property
    def num_running(self) -> int:
        """Sequences in the running batch (an n > 1 request counts n times): the load on the worker."""
        return len(self.queues.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for admission (including ones preempted by recompute)."""
        return len(self.queues.waiting)

    # Steps --------------------------------------------------------------------------------------

    def schedule(self) -> StepInput:
        step = self.mirror.begin_step(self.config.max_num_batched_tokens)
        self.predictive.tightened = self.thrash.thrashing
        self.planner.plan(step, self.config)
        counters = self.counters
        counters.computed_tokens += step.num_computed
        counters.recomputed_tokens += step.num_recomputed
        self._watch_thrashing()
        if self.groups.awaiting:
            self.groups.attach_awaiting()
        for parent in step.forks:
            children, copies = self.groups.fork(parent)
            # Copies (contiguous allocator only) read KV this step computes: send them next step.
            self.mirror.fork_copies += copies
            for child in children:
                self._seqs[child.seq_id] = child
        if self.handoff is not None:
            self.handoff.plan(self, step)
        step_input = self.mirror.finish_step(step)
        if self.store is not None:
            step_input.store_saves, step_input.store_loads = self.store.take(step_input.step_id)
        self.transfers.fill(step_input)
        return step_input

    def update(self, step: StepInput, output: StepOutput) -> list[RequestOutput]:
        """Apply a step's results (in step order). Returns one RequestOutput per request with news."""
        if self.store is not None:
            failed_loads = self.store.step_done(step, output, sent=not is_empty(step))
            if failed_loads:
                self.kv.forget_blocks(failed_loads)
        outputs, running_finished = self.processor.process(step, output, self.kv)
        if running_finished:
            self.queues.drop_finished_running()
        if self.handoff is not None:
            self.handoff.after_update(self, step, output)
        return outputs

    # KV hand-off between workers (gateway/handoff.py) -------------------------------------------

    def start_transfer(self, request: Request) -> None:
        """The request's KV leaves for a decode worker: its sequences (children included) keep their
        blocks but leave the running batch, so no step schedules them here any more."""
        for seq in request.live_seqs():
            seq.status = TRANSFERRING
        self.queues.drop_finished_running()  # keeps only RUNNING sequences

    def release_transferred(self, request: Request) -> None:
        """The decode worker holds the request's KV: it leaves this scheduler without finishing. Its
        blocks return to the pool (full ones stay cached for later hits), the worker drops it."""
        for seq in request.live_seqs():
            self.kv.free(seq)
            self._seqs.pop(seq.seq_id, None)
            self.mirror.drop(seq)
        self.requests.pop(request.request_id, None)

    def resume_transferring(self, request: Request) -> None:
        """A hand-off was given up: the request goes on here. Its blocks and the worker's state of it
        were kept all along, so it rejoins the running batch where it left it (a first token still
        in flight is decoded next, as after any sampling step)."""
        for seq in request.live_seqs():
            self.queues.add_running(seq)

    def first_token_requests(self, step: StepBuilder) -> list[Request]:
        """Requests whose first output token this step samples: it computes their prompt's last chunk
        (not a later step that decodes the first token's placeholder, overlapped)."""
        seqs = self._seqs
        found = []
        for seq_id, scheduled in step.scheduled.items():
            if scheduled.sample:
                seq = seqs[seq_id]
                num_prompt_tokens = seq.request.num_prompt_tokens
                if seq.index == 0 and scheduled.start + scheduled.num_tokens == num_prompt_tokens == len(seq.token_ids):
                    found.append(seq.request)
        return found

    def adopt_transferred(self, request: Request) -> None:
        """A request whose KV came in by transfer (its block tables are in the allocator already,
        KVCacheManager.adopt_transfer) and whose first token is known joins the running batch: its
        sequences decode from the token after the prompt, each a NewSequence to this worker."""
        self.queues.stamp_arrival(request)
        self.requests[request.request_id] = request
        seqs = request.live_seqs()
        for seq in seqs:
            seq.on_worker = False
            seq.ignore_results_until = -1  # step ids of the worker it came from mean nothing here
            seq.num_computed = request.num_prompt_tokens
            self._seqs[seq.seq_id] = seq
            self.queues.add_running(seq)

    # Statistics and audit -----------------------------------------------------------------------

    def _work_totals(self) -> WorkTotals:
        counters = self.counters
        pool = self.kv.stats()
        return WorkTotals(
            computed_tokens=counters.computed_tokens,
            recomputed_tokens=counters.recomputed_tokens,
            preemptions=counters.preemptions,
            evictions=counters.evictions_before + pool.evictions,
            refetched_blocks=counters.refetched_before + pool.refetched_blocks,
            prefix_queries_tokens=counters.prefix_queries_tokens,
            prefix_hits_tokens=counters.prefix_hits_tokens,
        )

    def _watch_thrashing(self) -> None:
        """Sample the work totals into the thrash detector (a clock read unless a sample is due)."""
        thrash = self.thrash
        if not thrash.sample_due():
            return
        change = thrash.observe(self._work_totals(), self.config)
        if change is None:
            return
        figures = thrash.figures
        event = "kv_thrashing" if change else "kv_thrashing_cleared"
        (log.warning if change else log.info)(
            event,
            worker=self.name,
            window_s=round(figures.seconds, 2),
            recompute_share=round(figures.recompute_share, 4),
            recomputed_tokens=figures.recomputed_tokens,
            computed_tokens=figures.computed_tokens,
            preemptions_per_s=round(figures.preemptions_per_s, 2),
            evictions_per_s=round(figures.evictions_per_s, 2),
            refetch_share=round(figures.refetch_share, 4),
            prefix_hit_rate=round(figures.prefix_hit_rate, 4),
            running_seqs=len(self.queues.running),
            waiting_requests=len(self.queues.waiting),
        )

    def stats(self) -> SchedulerStats:
        self._watch_thrashing()  # an idle scheduler's window slides on too
        pool = self.kv.stats()
        counters = self.counters
        queues = self.queues
        figures = self.thrash.figures
        share = self.lengths.mean_share()
        return extend(
            pool,
            SchedulerStats,
            evictions=counters.evictions_before + pool.evictions,
            refetched_blocks=counters.refetched_before + pool.refetched_blocks,
            running_seqs=len(queues.running),
            running_requests=queues.num_running_requests,
            waiting_requests=len(queues.waiting),
            swapped_requests=len(queues.swapped),
            prefix_queries_tokens=counters.prefix_queries_tokens,
            prefix_hits_tokens=counters.prefix_hits_tokens,
            store_hits_tokens=counters.store_hits_tokens,
            store_misses_tokens=counters.store_misses_tokens,
            preemptions=counters.preemptions,
            swaps_out=counters.swaps_out,
            swaps_in=counters.swaps_in,
            kv_transfers_in_flight=len(self.transfers.open),
            computed_tokens=counters.computed_tokens,
            recomputed_tokens=counters.recomputed_tokens,
            window_s=figures.seconds,
            goodput=figures.goodput,
            preemptions_per_s=figures.preemptions_per_s,
            evictions_per_s=figures.evictions_per_s,
            refetch_share=figures.refetch_share,
            window_prefix_hit_rate=figures.prefix_hit_rate,
            kv_thrashing=self.thrash.thrashing,
            admission_margin=self.margin.z,
            expected_output_share=1.0 if share is None else share,
        )

    def audit(self) -> AccountingReport:
        """The allocator's own invariants plus: exactly the running and swapped sequences hold
        blocks, each as many slots as it has computed; waiting sequences are waiting."""
        report = self.kv.audit()
        if self.store is not None:
            report.problems += self.store.index.audit()
        queues = self.queues
        holding = {seq.seq_id for seq in queues.running}
        holding |= {seq.seq_id for request in queues.swapped for seq in request.live_seqs()}
        holding |= {seq.seq_id for seq in self._seqs.values() if seq.status is TRANSFERRING}
        tables = self.kv.seqs
        if set(tables) != holding:
            report.problems.append(f"block tables for {sorted(tables)} but running/swapped are {sorted(holding)}")
        for seq in queues.running:
            if seq.status is not RUNNING:
                report.problems.append(f"seq {seq.seq_id} in the running list is {seq.status.value}")
            record = tables.get(seq.seq_id)
            if record is not None and record.num_slots != seq.num_computed:
                report.problems.append(f"seq {seq.seq_id}: {record.num_slots} slots for {seq.num_computed} computed tokens")
        if len(queues.running) > self.config.max_num_seqs:
            report.problems.append(f"{len(queues.running)} running sequences > max_num_seqs")
        for request in queues.waiting:
            for seq in request.live_seqs():
                if seq.status is not SequenceStatus.WAITING:
                    report.problems.append(f"seq {seq.seq_id} of waiting request {request.request_id} is {seq.status.value}")
        return report
