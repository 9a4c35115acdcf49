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
- scheduler_stats.py: what it counts and learns over its whole life (counters, output lengths, the
  admission margin, the thrash detector's window of recompute share, preemption and eviction rates:
  while the pool thrashes, admission tightens), and the snapshot (stats.py) read by metrics, the
  admin API and the simulator;
- handoff_moves.py: its part in the KV hand-offs between prefill and decode workers, which
  gateway/handoff.py coordinates through its `HandoffHooks` and these moves; transfer_items.py: the
  KV transfer items of its next step.
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

from paged.gateway.admission import PredictiveAdmission, check_arrival
from paged.gateway.block_accounting import AccountingReport
from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.contiguous_allocator import ContiguousAllocator
from paged.gateway.demand_forecast import DemandForecast
from paged.gateway.handoff_moves import HandoffHooks, HandoffMoves
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.kv_store_index import KVStoreIndex
from paged.gateway.kv_store_session import KVStoreSession
from paged.gateway.output_processor import OutputProcessor
from paged.gateway.outputs import RequestOutput
from paged.gateway.policy_queues import PolicyQueues, request_order
from paged.gateway.preemption import Preemption
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.gateway.sequence_groups import SequenceGroups, fork_again_if_nothing_sampled, reset_for_recompute
from paged.gateway.scheduler_stats import SchedulerFigures
from paged.gateway.stats import SchedulerStats
from paged.gateway.step_builder import StepBuilder, WorkerMirror, is_empty
from paged.gateway.step_planner import StepPlanner
from paged.gateway.transfer_items import TransferItems
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import StepInput, StepOutput

RUNNING = SequenceStatus.RUNNING
FINISHED = SequenceStatus.FINISHED
TRANSFERRING = SequenceStatus.TRANSFERRING


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
        figures: SchedulerFigures | None = None,
    ) -> None:
        """`store_index`: the host KV store this worker attached (None: none); `worker_name` names the
        replica to it; `context_cost` weighs depth in the depth eviction policy (from the registration);
        `figures`: what the schedulers of the worker's earlier sessions counted and learned."""
        self.config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self.name = worker_name  # the worker's replica: its log events and its KV store session name it
        self._num_blocks = num_blocks
        self._num_host_blocks = num_host_blocks
        self._store_index = store_index if uses_kv_store(cache_config) else None
        self._context_cost = context_cost
        self.handoff: HandoffHooks | None = None
        self.figures = figures or SchedulerFigures(worker_name, clock)  # outlives a lost worker's session
        self._start_empty()

    def _start_empty(self) -> None:
        """Fresh parts: an empty allocator, queues and worker mirror (what `figures` counts and learns carries on)."""
        index = self._store_index
        self.store = KVStoreSession(index, self.name) if index is not None else None
        self.kv = make_allocator(self.cache_config, self._num_blocks, self._num_host_blocks, self.store, self._context_cost)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._seqs: dict[int, Sequence] = {}  # live sequences by id
        self.queues = PolicyQueues(self.config.scheduling_policy == "priority")
        self.groups = SequenceGroups(self.kv, self.queues)
        self.mirror = WorkerMirror()
        figures = self.figures
        preemption = Preemption(self.kv, self.queues, self.groups, self.mirror, figures.counters)
        watermark_blocks = int(self.config.kv_watermark * self._num_blocks)
        forecast = DemandForecast(figures.lengths, self.kv.block_size)
        self.predictive = PredictiveAdmission(self.kv, forecast, figures.margin)
        self.planner = StepPlanner(
            self.kv, self.queues, self.groups, preemption, figures.counters, watermark_blocks, self.predictive
        )
        self.processor = OutputProcessor(self._seqs, self._end_seq, self._finish_request)
        self.transfers = TransferItems()
        self.handoff_moves = HandoffMoves(self.requests, self._seqs, self.kv, self.queues, self.mirror)

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
        """Drop a request and free its blocks now; the next step tells the worker. A running
        sequence's output length counts for admission's model like any other end: a stop string
        (matched on text, in the API layer) and a client that leaves both end it here, and when
        blocks are freed is what the model forecasts."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        for seq in request.live_seqs():
            if seq.status is RUNNING:
                self._observe_length(seq)
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
        self._observe_length(seq)
        self._finish_seq(seq, reason)
        if seq.request.finished:
            self._forget_request(seq.request, was)
        return was

    def _observe_length(self, seq: Sequence) -> None:
        self.figures.lengths.observe(seq.num_output_tokens, seq.max_num_tokens - seq.request.num_prompt_tokens)

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
        self.figures.allocator_dropped(self.kv.stats())
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
        figures = self.figures
        self.predictive.tightened = figures.thrash.thrashing
        self.planner.plan(step, self.config)
        self._announce_computing(step)
        counters = figures.counters
        counters.computed_tokens += step.num_computed
        counters.recomputed_tokens += step.num_recomputed
        figures.watch_thrashing(self.kv, self.queues, self.config)
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

    def _announce_computing(self, step: StepBuilder) -> None:
        """Let the next steps take the full blocks this one completes as prefix hits, before its
        output is back (gateway/in_flight_blocks.py)."""
        if not self.kv.enable_prefix_caching:
            return
        size = self.kv.block_size
        seqs = self._seqs
        for seq_id, scheduled in step.scheduled.items():
            end = scheduled.start + scheduled.num_tokens
            if end // size != scheduled.start // size and seq_id in seqs:
                self.kv.announce_computing(step.step_id, seqs[seq_id], scheduled.start, end)

    def update(self, step: StepInput, output: StepOutput) -> list[RequestOutput]:
        """Apply a step's results (in step order). Returns one RequestOutput per request with news."""
        unwritten = self.kv.settle_step(step.step_id, {error.seq_id for error in output.errors})
        unloaded: list[int] = []
        if self.store is not None:
            failed_loads = self.store.step_done(step, output, sent=not is_empty(step))
            if failed_loads:
                unloaded = self.kv.forget_blocks(failed_loads)
        outputs, running_finished = self.processor.process(step, output, self.kv)
        if unloaded:
            outputs += self._fail_readers(unloaded, "its cached prompt blocks failed to load from the host KV store")
        if unwritten:
            outputs += self._fail_readers(unwritten, "its cached prompt blocks were never computed: the sequence computing them failed")
        if running_finished:
            self.queues.drop_finished_running()
        if self.handoff is not None:
            self.handoff.after_update(self, step, output)
        return outputs

    def _fail_readers(self, blocks: list[int], message: str) -> list[RequestOutput]:
        """End the requests still holding blocks a failed step item was to fill (a store load, or
        a prompt chunk whose blocks were announced in flight). That step failed its own sequences;
        these took the blocks as prefix hits in a step built before its output came back
        (overlapped), so their KV reads content that never arrived."""
        unloaded = set(blocks)
        readers = [
            seq_id for seq_id, record in self.kv.seqs.items() if not record.swapped and not unloaded.isdisjoint(record.table)
        ]
        return self.fail_sequences(dict.fromkeys(readers, message))

    # Statistics (scheduler_stats.py) and audit -------------------------------------------------

    def stats(self) -> SchedulerStats:
        self.figures.watch_thrashing(self.kv, self.queues, self.config)  # an idle scheduler's window slides on too
        return self.figures.snapshot(self.kv.stats(), self.queues, len(self.transfers.open))

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
