"""The scheduling decisions of one step: which sequences compute how many tokens, which waiting or
swapped requests join the running batch, and which running ones are preempted to make room.

Model (as vLLM v1): no prefill or decode phases. Each sequence has `num_computed` and `num_tokens`;
a step hands out a token budget so that computed catches up with known, which covers chunked
prefill, prefix-cache hits and decodes alike.

Policies (SchedulerConfig.scheduling_policy):
- decode-first (default): running sequences get the token budget first; new prefills take what is
  left, and none are admitted in a step that had to preempt. This keeps inter-token latency steady
  under load and never trades a running request's progress for a new one: admitted work finishes.
- prefill-first: waiting requests are admitted first (lower time to first token, burstier decodes).
- priority: like decode-first, but the queues are ordered by (priority, arrival) and a waiting
  request may preempt running ones of a less important priority (gateway/preemption.py).
Swapped requests come back before any new admission, oldest first, while they fit.

Admission (SchedulerConfig.admission_policy): greedy admits the head of the waiting queue when its
blocks fit now (above the watermark), which over-commits the pool: running sequences later run out
of blocks and are preempted. predictive (the default) also asks PredictiveAdmission
(gateway/admission.py) whether the pool is expected to hold the running sequences' growth and the
request's own for their whole run, and backfills a smaller request past a head that does not fit.
Under predictive admission a running sequence that finds no block waits a few steps for one to be
freed before the tail is preempted (MAX_BLOCK_WAIT_STEPS).

Shared prompts: a waiting request whose prompt continues its prefix hit with a block this step
computes for another sequence waits for the next step (the requests behind it go first), where that
block is a hit even before this step's output is back (gateway/in_flight_blocks.py). A burst of
requests with one system prompt so computes it once, not once per request admitted meanwhile.
"""

from __future__ import annotations

from typing import NamedTuple

from paged.gateway.admission import PredictiveAdmission, may_take_seats, reserve_blocks
from paged.gateway.block_allocator import BlockAllocator, CacheHit
from paged.gateway.policy_queues import PolicyQueues
from paged.gateway.preemption import Preemption
from paged.gateway.request import Request, Sequence
from paged.gateway.sequence_groups import SequenceGroups
from paged.gateway.stats import SchedulerCounters
from paged.gateway.step_builder import StepBuilder
from paged.shared.config import SchedulerConfig


# Predictive admission backfills: when the head of the waiting queue does not fit, one of the next
# BACKFILL_DEPTH requests may (a small request fills a gap a large one cannot: in the simulator,
# 0.7% fewer steps than without; deeper, more preemptions). A head is passed over at most
# MAX_BYPASSES times, then waits for room itself, so it is never starved.
BACKFILL_DEPTH = 8
MAX_BYPASSES = 64
# A running sequence that finds no free block waits (is not scheduled) for up to this many steps in a
# row for a finishing sequence to free some, before the tail is preempted. Under predictive admission
# the pool runs short when the forecast's margin was not enough: briefly, until one of the many running
# sequences ends. Waiting costs a few sequences a step each; preempting costs a whole request its KV
# (the simulator's figures are in docs/admission.md).
MAX_BLOCK_WAIT_STEPS = 4
# A head that did not fit is probed again after this many steps even if no block was freed: the
# demand forecast moves with time (running sequences draw nearer their ends, so a request admitted
# later overlaps less of their growth). Without it, a small pool whose running sequences end
# together drains before the next one is admitted; probing every step admits at the margin more
# often, with learned lengths (docs/admission.md).
REPROBE_STEPS = 4
# A waiting request whose prompt continues a prefix hit with blocks this step computes for another
# waits one step, to take them as hits then, instead of computing them again in its own blocks: as
# many requests as this are looked past for one that does not wait.
MAX_LOOK_PAST = 64


class BlockedAt(NamedTuple):
    """An admission attempt that failed: for whom, and the pool, budget and step it saw."""

    head: Request
    free_blocks: int
    budget: int
    step_id: int


class StepPlanner:
    def __init__(
        self,
        allocator: BlockAllocator,
        queues: PolicyQueues,
        groups: SequenceGroups,
        preemption: Preemption,
        counters: SchedulerCounters,
        watermark_blocks: int,
        predictive: PredictiveAdmission,
    ) -> None:
        self.allocator = allocator
        self.queues = queues
        self.groups = groups
        self.preemption = preemption
        self.counters = counters
        self.watermark_blocks = watermark_blocks
        self.predictive = predictive
        # When the head of waiting, or backfilling past it, last failed to be admitted.
        self._blocked_head: BlockedAt | None = None
        self._blocked_backfill: BlockedAt | None = None

    def plan(self, step: StepBuilder, config: SchedulerConfig) -> None:
        self.predictive.begin_step()
        self._plan(step, config)
        if not step.preempted:
            self.predictive.margin.calm_step()

    def _plan(self, step: StepBuilder, config: SchedulerConfig) -> None:
        if config.scheduling_policy == "prefill-first":
            self._swap_in(step, config)
            if not self.queues.swapped:
                self._admit_waiting(step, config)
            self._schedule_running(step, config)
        else:
            self._schedule_running(step, config)
            if not step.out_of_blocks:
                if self._swap_in(step, config):
                    self._schedule_running(step, config)
                if not step.out_of_blocks and not self.queues.swapped:
                    self._admit_waiting(step, config)

    def _schedule_running(self, step: StepBuilder, config: SchedulerConfig) -> None:
        """The token budget over the running batch, in order. A sequence that cannot grow waits for a
        finishing one to free blocks (predictive admission, up to MAX_BLOCK_WAIT_STEPS steps in a row,
        unless the tail is less important), else preempts the tail until it can (or is the tail itself)."""
        running = self.queues.running
        scheduled = step.scheduled
        grow = self.allocator.grow
        may_wait = config.admission_policy == "predictive" and self.allocator.grows_on_demand
        waited: list[Sequence] = []
        ending = False  # a step in flight samples a sequence's last token: its result frees blocks
        index = 0
        while index < len(running) and step.budget > 0:
            seq = running[index]
            index += 1
            num_tokens = seq.num_tokens
            num_new = num_tokens - seq.num_computed
            # A final token already in flight needs no KV.
            if num_tokens >= seq.max_num_tokens:
                ending = True
                continue
            # Nothing to compute.
            if num_new <= 0 or seq.seq_id in scheduled:
                continue
            if num_new > step.budget:
                num_new = step.budget
            copies = grow(seq, num_new)
            # Under the priority policy a sequence never waits on a less important one's blocks:
            # that one is preempted at once, as for a waiting request (Preemption.may_preempt_for).
            if (
                copies is None
                and may_wait
                and seq.block_waits < MAX_BLOCK_WAIT_STEPS
                and not self.preemption.may_preempt_for(seq.request)
            ):
                waited.append(seq)
                continue
            if copies is None:
                # Out of blocks (free and cached-free alike): admission promised too much.
                self.predictive.margin.preempted()
            while copies is None:
                victim = self.preemption.victim()
                self.preemption.preempt(victim, step, config.preemption_mode)
                if victim is seq.request:
                    return
                copies = grow(seq, num_new)
            seq.block_waits = 0
            step.emit(self.allocator, seq, num_new, copies)
        if not waited:
            return
        if not scheduled and not ending:
            # Nothing progresses and no step in flight ends a sequence, so nothing would free
            # blocks: waiting cannot help.
            for seq in waited:
                seq.block_waits = MAX_BLOCK_WAIT_STEPS
            self._schedule_running(step, config)
            return
        step.short_of_blocks = True
        self.counters.block_waits += len(waited)
        for seq in waited:
            seq.block_waits += 1

    def _swap_in(self, step: StepBuilder, config: SchedulerConfig) -> bool:
        """Bring swapped requests back, oldest first, while they fit above the watermark and, under
        predictive admission, in the forecast."""
        queues = self.queues
        predictive = config.admission_policy == "predictive" and self.allocator.grows_on_demand
        swapped_in = False
        while queues.swapped:
            request = queues.swapped[0]
            seqs = request.live_seqs()
            if not may_take_seats(request, seqs, self.groups.seats_taken(), config):
                break
            if predictive and not self.predictive.fits_swapped(request, seqs, queues.running, self.groups.awaiting, config):
                break
            copies = self.allocator.swap_in(seqs, reserve_blocks(self.watermark_blocks, len(queues.running)))
            if copies is None:
                break
            if predictive:
                self.predictive.admitted()
            queues.swapped.pop(0)
            step.swap_in.extend(copies)
            self.counters.swaps_in += len(copies)
            for seq in seqs:
                queues.add_running(seq)
            swapped_in = True
        return swapped_in

    def _admit_waiting(self, step: StepBuilder, config: SchedulerConfig) -> None:
        queues = self.queues
        while queues.waiting and step.budget > 0:
            request = self._next_waiting(step)
            if request is None:
                return
            seqs = request.live_seqs()
            if not may_take_seats(request, seqs, self.groups.seats_taken(), config):
                return
            free = self.allocator.num_free_blocks
            # A head that did not fit is not probed again until blocks are freed, its chunk shrinks or
            # REPROBE_STEPS pass.
            if not self._still_blocked(self._blocked_head, request, free, step, reprobe=True):
                if self._admit(request, seqs, step, config):
                    continue
                self._blocked_head = BlockedAt(request, free, step.budget, step.step_id)
            if self.preemption.may_preempt_for(request):
                self.preemption.preempt(self.preemption.victim(), step, config.preemption_mode)
                self.predictive.begin_step()  # the forecast counted the victim
                continue
            if config.admission_policy != "predictive" or self._still_blocked(self._blocked_backfill, request, free, step):
                return
            if not self._backfill(request, step, config):
                self._blocked_backfill = BlockedAt(request, free, step.budget, step.step_id)
                return

    def _next_waiting(self, step: StepBuilder) -> Request | None:
        """The head of the waiting queue, or when the head awaits blocks this step completes (a
        burst of requests with one system prompt), the first request behind it that does not."""
        if not step.completing:
            return self.queues.waiting[0]
        for request in self.queues.waiting[:MAX_LOOK_PAST]:
            if not self._awaits_completing(request, step):
                return request
        return None

    def _awaits_completing(self, request: Request, step: StepBuilder) -> bool:
        seq = request.live_seqs()[0]
        num_hit = self.allocator.probe(seq).num_tokens // self.allocator.block_size
        # The probe hashed every block a hit may cover (the one holding the last token never is).
        return num_hit < (len(seq.token_ids) - 1) // self.allocator.block_size and seq.block_hashes[num_hit] in step.completing

    def _still_blocked(
        self, blocked: BlockedAt | None, head: Request, free: int, step: StepBuilder, reprobe: bool = False
    ) -> bool:
        """Nothing has changed for the head since an admission attempt past it failed: no block was
        freed, the token budget is no larger and, with `reprobe`, fewer than REPROBE_STEPS steps have
        passed. (Backfilling is probed again only when blocks are freed: a probe there costs a forecast
        per candidate, and in the simulator probing it on time as well gained nothing.)"""
        return (
            blocked is not None
            and blocked.head is head
            and free <= blocked.free_blocks
            and step.budget >= blocked.budget
            and (not reprobe or step.step_id - blocked.step_id < REPROBE_STEPS)
            and bool(self.queues.running)
        )

    def _backfill(self, head: Request, step: StepBuilder, config: SchedulerConfig) -> bool:
        """Admit one of the next few waiting requests of the head's priority that fits where the
        head does not (predictive admission only). Bounded: a head passed over MAX_BYPASSES times
        is not passed over again until it is admitted, so it is never starved."""
        if head.times_bypassed >= MAX_BYPASSES:
            return False
        waiting = self.queues.waiting
        after = waiting.index(head) + 1
        for candidate in waiting[after : after + BACKFILL_DEPTH]:
            if candidate.order[0] != head.order[0]:
                break
            if step.completing and self._awaits_completing(candidate, step):
                continue
            seqs = candidate.live_seqs()
            if may_take_seats(candidate, seqs, self.groups.seats_taken(), config) and self._admit(candidate, seqs, step, config):
                head.times_bypassed += 1
                return True
        return False

    def _admit(self, request: Request, seqs: list[Sequence], step: StepBuilder, config: SchedulerConfig) -> bool:
        """All of a request's live sequences join the running batch, or none do (a recomputed
        n > 1 request admits its first and lets the others await its prompt: sequence_groups.py).
        Under predictive admission only if the pool is expected to hold it (admission.py)."""
        seqs, awaiting = self.groups.split_for_admission(request, seqs)
        allocator = self.allocator
        hits = [allocator.probe(seq) for seq in seqs]
        predictive = config.admission_policy == "predictive" and allocator.grows_on_demand
        if predictive and not self.predictive.fits(
            request, seqs, hits, awaiting, self.queues.running, self.groups.awaiting, config
        ):
            return False
        reserve = reserve_blocks(self.watermark_blocks, len(self.queues.running))
        budget = step.budget
        num_children = request.params.n - 1 if not request.forked else 0
        admitted: list[tuple[Sequence, CacheHit, int]] = []
        for index, seq in enumerate(seqs):
            # Probe again after the first: the blocks taken before may have evicted what it would hit.
            hit = hits[0] if index == 0 else allocator.probe(seq)
            num_new = min(seq.num_tokens - hit.num_tokens, budget)
            if not allocator.admit(seq, hit, num_new, reserve, num_children):
                for taken, _, _ in admitted:
                    allocator.free(taken)
                return False
            admitted.append((seq, hit, num_new))
            budget -= num_new
        self.queues.take_waiting(request)
        request.mark_scheduled(num_cached_tokens=admitted[0][1].num_tokens)
        counters = self.counters
        for seq, hit, num_new in admitted:
            num_cached = hit.num_tokens
            if allocator.enable_prefix_caching:
                counters.prefix_queries_tokens += seq.num_tokens
                counters.prefix_hits_tokens += num_cached
                counters.store_hits_tokens += len(hit.store_hits) * allocator.block_size
                counters.store_misses_tokens += hit.store_miss_tokens
            seq.num_computed = num_cached
            self.queues.add_running(seq)
            if num_new:
                step.emit(allocator, seq, num_new, [])
        if awaiting:
            self.groups.await_shared_prompt(request, awaiting)
        if predictive:
            self.predictive.admitted()
        return True
