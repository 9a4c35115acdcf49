"""Iteration-level scheduler: every step decides which sequences compute how many tokens, in
which blocks, and what the worker must free, swap or copy first.

Model (as vLLM v1): no prefill or decode phases. Each sequence has `num_computed` and `num_tokens`;
a step hands out a token budget so that computed catches up with known, which covers chunked
prefill, prefix-cache hits and decodes alike.

Overlapped scheduling: the engine may call schedule() for step N+1 before update() for step N.
A step that samples a sequence adds a placeholder token at once (num_tokens += 1), so the next
schedule() can already send the decode of that token, which only the worker knows yet. Stop rules
run in update(); a sequence found finished there is freed and the stale result of an extra step
already sent for it is ignored. Blocks join the prefix cache in update(), once the step that
computed them is done and all their token ids are known.

Policies (SchedulerConfig.scheduling_policy):
- decode-first (default): running sequences get the token budget first; new prefills take what is
  left, and none are admitted in a step that had to preempt. This keeps inter-token latency steady
  under load and never trades a running request's progress for a new one: admitted work finishes.
- prefill-first: waiting requests are admitted first (lower time to first token, burstier decodes).
- priority: like decode-first, but the waiting and running queues are ordered by (priority,
  arrival) and a waiting request may preempt running ones of a less important priority.
Priority values follow vLLM: LOWER is more important. Within a priority it is first come, first
served; the preemption victim is always the least important, latest-arrived request, and an n > 1
request is preempted whole.

Preemption (when a running sequence cannot get a block): recompute frees the blocks and puts the
request back ahead of later arrivals (its prompt and generated tokens are recomputed later, mostly
from the prefix cache); swap copies its blocks to the host pool and brings them back before any
new admission once memory frees. Swap falls back to recompute when the host pool is short.

Progress: add_request refuses (400) a request whose peak, running alone, exceeds the pool, and a
recomputed n > 1 request shares its prompt blocks again (see _admit), so it never needs more than
that peak. Victims are always the latest arrivals, so the oldest running request can always take
the whole pool and finish: admitted work finishes, it is never stuck waiting or preempting itself.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from paged.gateway.contiguous_allocator import ContiguousAllocator
from paged.gateway.engine_client import AdmissionError
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.outputs import RequestOutput, SequenceDelta
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import BlockCopy, NewSequence, ScheduledSeq, StepInput, StepOutput

RUNNING = SequenceStatus.RUNNING
FINISHED = SequenceStatus.FINISHED


@dataclass(slots=True)
class SchedulerStats:
    num_blocks: int
    free_blocks: int
    used_blocks: int
    cached_blocks: int
    shared_blocks: int
    slots_reserved: int
    slots_filled: int
    kv_utilization: float  # slots holding tokens / slots reserved (0 when nothing is reserved)
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    evictions: int
    preemptions: int
    swaps_out: int  # blocks copied device -> host
    swaps_in: int  # blocks copied host -> device
    num_running: int  # sequences
    num_waiting: int  # requests
    num_swapped: int  # requests


@dataclass(slots=True)
class _StepBuilder:
    step_id: int
    budget: int
    scheduled: dict[int, ScheduledSeq] = field(default_factory=dict)
    copies: dict[int, list[BlockCopy]] = field(default_factory=dict)  # copy-on-write, by sequence
    fork_copies: list[BlockCopy] = field(default_factory=list)  # from the previous step's forks
    new_seqs: dict[int, NewSequence] = field(default_factory=dict)
    forks: list[Sequence] = field(default_factory=list)  # parents whose children appear after this step
    swap_out: list[BlockCopy] = field(default_factory=list)
    swap_in: list[BlockCopy] = field(default_factory=list)
    preempted: bool = False


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        num_host_blocks: int = 0,
    ) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self._num_host_blocks = num_host_blocks
        self.kv = self._make_manager(num_blocks)
        self.watermark_blocks = int(scheduler_config.kv_watermark * num_blocks)
        self._by_priority = scheduler_config.scheduling_policy == "priority"
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: list[Request] = []  # sorted by Request.order
        self.swapped: list[Request] = []  # sorted by Request.order
        self.running: list[Sequence] = []  # sorted by (request order, index); the tail is the next victim
        self._awaiting_prompt: list[Request] = []  # running requests with awaiting_shared_prompt sequences
        self._seqs: dict[int, Sequence] = {}  # live sequences by id
        self._freed_seq_ids: list[int] = []  # for the next StepInput
        self._fork_copies: list[BlockCopy] = []  # for the next StepInput
        self._waiting_tokens = 0
        # (head of waiting, free blocks, token budget) when it last failed to fit
        self._blocked_head: tuple[Request, int, int] | None = None
        self._next_step_id = 0
        self._arrivals = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._preemptions = 0
        self._swaps_out = 0
        self._swaps_in = 0
        self._evictions_before = 0  # evictions of managers dropped by take_all_requests

    def _make_manager(self, num_blocks: int) -> KVCacheManager | ContiguousAllocator:
        cache = self.cache_config
        if cache.kv_allocator == "contiguous":
            return ContiguousAllocator(num_blocks, cache.block_size)
        return KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, self._num_host_blocks)

    # Requests in and out ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or refuse it: 400 if it can never fit, 429 if the waiting queue is full."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        prompt_len = request.num_prompt_tokens
        if prompt_len >= self.max_model_len:
            raise AdmissionError(
                f"prompt has {prompt_len} tokens but the context window is {self.max_model_len} tokens, "
                "which leaves no room for output",
                400,
            )
        if request.params.n > self.config.max_num_seqs:
            raise AdmissionError(
                f"n={request.params.n} sequences can never run at once: max_num_seqs is {self.config.max_num_seqs}",
                400,
            )
        max_num_tokens = min(prompt_len + request.params.max_tokens, self.max_model_len)
        peak = self.kv.peak_blocks(prompt_len, max_num_tokens, request.params.n)
        if peak > self.kv.num_blocks:
            raise AdmissionError(
                f"request needs up to {peak} KV blocks of {self.cache_config.block_size} tokens "
                f"(prompt {prompt_len} tokens, up to {max_num_tokens} tokens per sequence, n={request.params.n}) "
                f"but the KV cache has {self.kv.num_blocks} blocks",
                400,
            )
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise AdmissionError(
                f"waiting queue full: {len(self.waiting)} requests waiting, limit {self.config.max_waiting_requests}",
                429,
            )
        if self._waiting_tokens + prompt_len > self.config.max_waiting_tokens:
            raise AdmissionError(
                f"waiting queue full: {self._waiting_tokens} prompt tokens waiting plus {prompt_len} "
                f"exceeds the limit of {self.config.max_waiting_tokens}",
                429,
            )
        self._arrivals += 1
        request.order = (request.priority if self._by_priority else 0, self._arrivals)
        for seq in request.seqs:
            seq.max_num_tokens = max_num_tokens
            seq.ignore_results_until = -1
        self.requests[request.request_id] = request
        for seq in request.live_seqs():
            self._seqs[seq.seq_id] = seq
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.waiting_tokens = sum(seq.num_tokens for seq in request.live_seqs())
        self._waiting_tokens += request.waiting_tokens
        bisect.insort(self.waiting, request, key=_request_order)

    def _pop_waiting(self) -> Request:
        request = self.waiting.pop(0)
        self._waiting_tokens -= request.waiting_tokens
        return request

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its blocks now; the next step tells the worker."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish_request(request, "abort")
        return True

    def _finish_request(self, request: Request, reason: str) -> None:
        """End every sequence of a request that has not ended (abort or error)."""
        live = request.live_seqs()
        was = live[0].status if live else FINISHED
        for seq in request.seqs:
            if seq.status is not FINISHED:
                self._finish_seq(seq, reason)
        if was is RUNNING:
            self.running = [seq for seq in self.running if seq.status is RUNNING]
            self._stop_awaiting_prompt(request)
        self._forget_request(request, was)

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        seq.status = FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)
        self._seqs.pop(seq.seq_id, None)
        if seq.on_worker:
            self._freed_seq_ids.append(seq.seq_id)
            seq.on_worker = False

    def _forget_request(self, request: Request, was: SequenceStatus) -> None:
        """Drop a request that has ended; `was` is the state of its sequences before the end."""
        self.requests.pop(request.request_id, None)
        request.finished_time = time.monotonic()
        if was is SequenceStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
            self._waiting_tokens -= request.waiting_tokens
        elif was is SequenceStatus.SWAPPED and request in self.swapped:
            self.swapped.remove(request)

    def reconfigure(self, scheduler_config: SchedulerConfig) -> None:
        """Apply a reloaded configuration (SIGHUP) to a running scheduler: the admission caps and the
        policy. Queued requests stay; a switch to or from the priority policy re-orders them."""
        self.config = scheduler_config
        by_priority = scheduler_config.scheduling_policy == "priority"
        if by_priority != self._by_priority:
            self._by_priority = by_priority
            for request in self.requests.values():
                request.order = (request.priority if by_priority else 0, request.order[1])
            self.waiting.sort(key=_request_order)
            self.swapped.sort(key=_request_order)
            self.running.sort(key=_seq_order)

    def take_all_requests(self) -> list[Request]:
        """The worker is gone: hand back every unfinished request, reset to be recomputed elsewhere,
        and start over with an empty block manager (the cached content died with the worker)."""
        requests = sorted(self.requests.values(), key=_request_order)
        for request in requests:
            for seq in request.live_seqs():
                _reset_for_recompute(seq)
                seq.ignore_results_until = -1
            _fork_again_if_nothing_sampled(request)
        self._evictions_before += self.kv.stats().evictions
        self.kv = self._make_manager(self.kv.num_blocks)
        self.requests.clear()
        self.waiting.clear()
        self.swapped.clear()
        self.running.clear()
        for request in self._awaiting_prompt:
            request.awaiting_shared_prompt = []
        self._awaiting_prompt.clear()
        self._seqs.clear()
        self._freed_seq_ids.clear()
        self._fork_copies.clear()
        self._waiting_tokens = 0
        return requests

    def prefix_match_tokens(self, token_ids: list[int], cache_salt: str | None) -> int:
        return self.kv.match_prefix(token_ids, cache_salt)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def needs_step(self) -> bool:
        """Unfinished requests, or frees the worker has not been told about yet."""
        return bool(self.requests) or bool(self._freed_seq_ids)

    @property
    def num_running(self) -> int:
        """Sequences in the running batch (an n > 1 request counts n times): the load on the worker."""
        return len(self.running)

    @property
    def num_running_requests(self) -> int:
        return len({seq.request for seq in self.running})

    @property
    def num_waiting(self) -> int:
        """Requests waiting for admission (including ones preempted by recompute)."""
        return len(self.waiting)

    # Scheduling ---------------------------------------------------------------------------------

    def schedule(self) -> StepInput:
        step = _StepBuilder(self._next_step_id, self.config.max_num_batched_tokens, fork_copies=self._fork_copies)
        self._fork_copies = []
        self._next_step_id += 1
        if self.config.scheduling_policy == "prefill-first":
            self._swap_in(step)
            if not self.swapped:
                self._admit_waiting(step)
            self._schedule_running(step)
        else:
            self._schedule_running(step)
            if not step.preempted:
                if self._swap_in(step):
                    self._schedule_running(step)
                if not step.preempted and not self.swapped:
                    self._admit_waiting(step)
        return self._finish_step(step)

    def _schedule_running(self, step: _StepBuilder) -> None:
        running = self.running
        scheduled = step.scheduled
        grow = self.kv.grow
        index = 0
        while index < len(running) and step.budget > 0:
            seq = running[index]
            index += 1
            num_tokens = seq.num_tokens
            num_new = num_tokens - seq.num_computed
            # Nothing to compute, or a final token already in flight that needs no KV.
            if num_new <= 0 or num_tokens >= seq.max_num_tokens or seq.seq_id in scheduled:
                continue
            if num_new > step.budget:
                num_new = step.budget
            copies = grow(seq, num_new)
            while copies is None:
                victim = running[-1].request
                self._preempt(victim, step)
                if victim is seq.request:
                    return
                copies = grow(seq, num_new)
            self._emit(step, seq, num_new, copies)

    def _swap_in(self, step: _StepBuilder) -> bool:
        """Bring swapped requests back, oldest first, while they fit above the watermark."""
        swapped_in = False
        while self.swapped:
            request = self.swapped[0]
            seqs = request.live_seqs()
            if self._seats_taken() + self._seats_needed(request, seqs) > self.config.max_num_seqs:
                break
            copies = self.kv.swap_in(seqs, self.watermark_blocks if self.running else 0)
            if copies is None:
                break
            self.swapped.pop(0)
            step.swap_in.extend(copies)
            self._swaps_in += len(copies)
            for seq in seqs:
                seq.status = RUNNING
                bisect.insort(self.running, seq, key=_seq_order)
            swapped_in = True
        return swapped_in

    def _admit_waiting(self, step: _StepBuilder) -> None:
        while self.waiting and step.budget > 0:
            request = self.waiting[0]
            seqs = request.live_seqs()
            if self._seats_taken() + self._seats_needed(request, seqs) > self.config.max_num_seqs:
                return
            # A head that did not fit is not probed again until blocks are freed or its chunk shrinks.
            blocked = self._blocked_head
            free = self.kv.num_free_blocks
            if not (
                blocked is not None
                and blocked[0] is request
                and free <= blocked[1]
                and step.budget >= blocked[2]
                and self.running
            ):
                if self._admit(request, seqs, step):
                    continue
                self._blocked_head = (request, free, step.budget)
            # Under the priority policy a more important request may take a less important one's blocks.
            if not (self._by_priority and self.running and self.running[-1].request.order[0] > request.order[0]):
                return
            self._preempt(self.running[-1].request, step)

    def _seats_taken(self) -> int:
        """Running sequences, counting the children that running n > 1 requests will fork and the
        sequences waiting to share a recomputed prompt."""
        return (
            len(self.running)
            + sum(seq.request.params.n - 1 for seq in self.running if seq.index == 0 and not seq.request.forked)
            + sum(len(request.awaiting_shared_prompt) for request in self._awaiting_prompt)
        )

    @staticmethod
    def _seats_needed(request: Request, seqs: list[Sequence]) -> int:
        return len(seqs) if request.forked else request.params.n

    def _admit(self, request: Request, seqs: list[Sequence], step: _StepBuilder) -> bool:
        """All of a request's live sequences join the running batch, or none do.

        A forked request (back after a recompute preemption) lost the prompt blocks its sequences
        shared, and each admitted with a copy of its own could need more than the whole pool: it
        would never run again, or preempt itself forever. So only its first live sequence takes
        blocks now; the others wait for it to recompute the full prompt blocks and then share them
        (_attach_awaiting_prompt), which keeps the request within the peak add_request checked."""
        awaiting: list[Sequence] = []
        if request.forked and len(seqs) > 1 and self.kv.shared_prompt_blocks(request.num_prompt_tokens):
            seqs, awaiting = seqs[:1], seqs[1:]
        reserve = self.watermark_blocks if self.running else 0
        budget = step.budget
        admitted: list[tuple[Sequence, int, int]] = []
        for seq in seqs:
            hit = self.kv.probe(seq)
            num_new = min(seq.num_tokens - hit.num_tokens, budget)
            num_children = request.params.n - 1 if not request.forked else 0
            if not self.kv.admit(seq, hit, num_new, reserve, num_children):
                for taken, _, _ in admitted:
                    self.kv.free(taken)
                return False
            admitted.append((seq, hit.num_tokens, num_new))
            budget -= num_new
        self._pop_waiting()
        now = time.monotonic()
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
            request.num_cached_tokens = admitted[0][1]
        for seq, num_cached, num_new in admitted:
            if self.kv.enable_prefix_caching:
                self._prefix_queries += seq.num_tokens
                self._prefix_hits += num_cached
            seq.num_computed = num_cached
            seq.status = RUNNING
            bisect.insort(self.running, seq, key=_seq_order)
            if num_new:
                self._emit(step, seq, num_new, [])
        if awaiting:
            request.awaiting_shared_prompt = awaiting
            self._awaiting_prompt.append(request)
        return True

    def _attach_awaiting_prompt(self) -> None:
        """Sequences awaiting a recomputed prompt share its full blocks once a step that computes
        them has been sent (the worker runs steps in order), and compute their own tokens from the
        next step on, as children do after a fork."""
        block_size = self.cache_config.block_size
        still_awaiting = []
        for request in self._awaiting_prompt:
            source = request.live_seqs()[0]
            num_blocks = self.kv.shared_prompt_blocks(request.num_prompt_tokens)
            if source.num_computed < num_blocks * block_size:
                still_awaiting.append(request)
                continue
            for seq in request.awaiting_shared_prompt:
                self.kv.share_prefix(source, seq, num_blocks)
                seq.num_computed = num_blocks * block_size
                seq.status = RUNNING
                bisect.insort(self.running, seq, key=_seq_order)
            request.awaiting_shared_prompt = []
        self._awaiting_prompt = still_awaiting

    def _stop_awaiting_prompt(self, request: Request) -> list[Sequence]:
        """Forget a request's sequences awaiting its recomputed prompt (it is preempted or ends)."""
        awaiting = request.awaiting_shared_prompt
        if awaiting:
            request.awaiting_shared_prompt = []
            self._awaiting_prompt.remove(request)
        return awaiting

    def _emit(self, step: _StepBuilder, seq: Sequence, num_new: int, copies: list[BlockCopy]) -> None:
        start = seq.num_computed
        computed = seq.num_computed = start + num_new
        seq_id = seq.seq_id
        table_from, new_blocks = self.kv.take_table_delta(seq)
        if computed != seq.num_tokens:  # a prefill chunk short of the known tokens: nothing to sample
            scheduled = ScheduledSeq(seq_id, start, num_new, table_from, new_blocks, False)
        else:
            seq.num_tokens = computed + 1
            request = seq.request
            if request.forked:
                scheduled = ScheduledSeq(seq_id, start, num_new, table_from, new_blocks)
            else:
                fork_ids = [child.seq_id for child in request.seqs[1:]]
                scheduled = ScheduledSeq(seq_id, start, num_new, table_from, new_blocks, True, fork_ids)
                step.forks.append(seq)
        if not seq.on_worker:
            step.new_seqs[seq_id] = NewSequence(seq_id, list(seq.token_ids), seq.sampling, seq.num_output_tokens)
            seq.on_worker = True
        step.scheduled[seq_id] = scheduled
        if copies:
            step.copies[seq_id] = copies
        step.budget -= num_new

    def _unschedule(self, step: _StepBuilder, seq: Sequence) -> None:
        scheduled = step.scheduled.pop(seq.seq_id, None)
        if scheduled is None:
            return
        step.copies.pop(seq.seq_id, None)
        step.budget += scheduled.num_tokens
        seq.num_computed = scheduled.start
        if scheduled.sample:
            seq.num_tokens -= 1
        if scheduled.fork_ids:
            step.forks.remove(seq)
        if step.new_seqs.pop(seq.seq_id, None) is not None:
            seq.on_worker = False

    def _preempt(self, request: Request, step: _StepBuilder) -> None:
        """Preempt a whole request, whose sequences sit at the tail of the running list."""
        step.preempted = True
        self._preemptions += 1
        request.num_preemptions += 1
        seqs = []
        while self.running and self.running[-1].request is request:
            seqs.append(self.running.pop())
        seqs.reverse()
        seqs += self._stop_awaiting_prompt(request)
        # The worker runs a step's swap-outs before its swap-ins and copies. So swap only sequences
        # it knows that have no work (and no copy-on-write copy) in this step, and never in a step
        # that swaps in: its host blocks, just freed, may not be overwritten before they are read.
        can_swap = (
            self.config.preemption_mode == "swap"
            and not step.swap_in
            and all(seq.on_worker and seq.seq_id not in step.scheduled for seq in seqs)
        )
        for seq in seqs:
            self._unschedule(step, seq)
        copies = self.kv.swap_out(seqs) if can_swap else None
        if copies is not None:
            step.swap_out.extend(copies)
            self._swaps_out += len(copies)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, request, key=_request_order)
            return
        for seq in seqs:
            self.kv.free(seq)
            if seq.on_worker:
                self._freed_seq_ids.append(seq.seq_id)
            _reset_for_recompute(seq)
            # Results of steps already sent for it belong to the dropped state. Not this step's: the
            # priority policy may admit it again within the step being built.
            seq.ignore_results_until = step.step_id - 1
        _fork_again_if_nothing_sampled(request)
        self._push_waiting(request)

    def _finish_step(self, step: _StepBuilder) -> StepInput:
        if self._awaiting_prompt:
            self._attach_awaiting_prompt()
        for parent in step.forks:
            request = parent.request
            request.forked = True
            for child in request.seqs[1:]:
                # Copies (contiguous allocator only) read KV this step computes: send them next step.
                self._fork_copies += self.kv.fork(parent, child)
                child.num_computed = parent.num_computed
                child.num_tokens = parent.num_tokens
                child.status = RUNNING
                child.on_worker = True
                self._seqs[child.seq_id] = child
                bisect.insort(self.running, child, key=_seq_order)
        copies = step.fork_copies + [copy for seq_copies in step.copies.values() for copy in seq_copies]
        freed, self._freed_seq_ids = self._freed_seq_ids, []
        return StepInput(
            step_id=step.step_id,
            scheduled=list(step.scheduled.values()),
            new_seqs=list(step.new_seqs.values()),
            freed_seq_ids=freed,
            swap_out=step.swap_out,
            swap_in=step.swap_in,
            copies=copies,
        )

    # Results ------------------------------------------------------------------------------------

    def update(self, step: StepInput, output: StepOutput) -> list[RequestOutput]:
        """Apply a step's results: cache newly full blocks, append sampled tokens, run the stop rules
        and free what finished. Returns one RequestOutput per request with news."""
        seqs = self._seqs
        step_id = step.step_id
        outputs: dict[str, RequestOutput] = {}
        for error in output.errors:
            seq = seqs.get(error.seq_id)
            if seq is not None and step_id > seq.ignore_results_until:
                request = seq.request
                request.error = error.message
                self._finish_request(request, "error")
                outputs[request.request_id] = RequestOutput(
                    request.request_id,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    finished=True,
                    error=error.message,
                )
        if self.kv.enable_prefix_caching:
            # Offer blocks this step completed; a decode that stays inside its block completes none.
            size = self.cache_config.block_size
            for scheduled in step.scheduled:
                end = scheduled.start + scheduled.num_tokens
                if end // size != scheduled.start // size:
                    seq = seqs.get(scheduled.seq_id)
                    if seq is not None and seq.status is RUNNING and step_id > seq.ignore_results_until:
                        self.kv.cache_computed(seq, end)
        any_finished = False
        for result in output.results:
            seq = seqs.get(result.seq_id)
            if seq is None or step_id <= seq.ignore_results_until or seq.num_tokens == len(seq.token_ids):
                continue
            request = seq.request
            token_ids = seq.token_ids
            token = result.token_id
            token_ids.append(token)
            if token in request.stop_token_ids:
                finish_reason = "stop"
            elif len(token_ids) >= seq.max_num_tokens:
                finish_reason = "length"
            else:
                finish_reason = None
            logprobs = seq.logprobs
            if logprobs is None:
                delta = SequenceDelta(seq.index, [token], None, None, finish_reason)
            else:
                logprob = result.logprob if result.logprob is not None else 0.0
                top_logprobs = result.top_logprobs or []
                logprobs.append(logprob)
                seq.top_logprobs.append(top_logprobs)
                delta = SequenceDelta(seq.index, [token], [logprob], [top_logprobs], finish_reason)
            request_id = request.request_id
            request_output = outputs.get(request_id)
            if request_output is None:
                request_output = outputs[request_id] = RequestOutput(
                    request_id, [delta], len(request.prompt_token_ids), request.num_cached_tokens
                )
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
            else:
                request_output.deltas.append(delta)
            if finish_reason is not None:
                was = seq.status
                any_finished |= was is RUNNING
                self._finish_seq(seq, finish_reason)
                if request.finished:
                    request_output.finished = True
                    self._forget_request(request, was)
        if any_finished:
            self.running = [seq for seq in self.running if seq.status is RUNNING]
        return list(outputs.values())

    # Statistics ---------------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        kv = self.kv.stats()
        return SchedulerStats(
            num_blocks=kv.num_blocks,
            free_blocks=kv.free_blocks,
            used_blocks=kv.used_blocks,
            cached_blocks=kv.cached_blocks,
            shared_blocks=kv.shared_blocks,
            slots_reserved=kv.slots_reserved,
            slots_filled=kv.slots_filled,
            kv_utilization=kv.slots_filled / kv.slots_reserved if kv.slots_reserved else 0.0,
            prefix_queries_tokens=self._prefix_queries,
            prefix_hits_tokens=self._prefix_hits,
            evictions=self._evictions_before + kv.evictions,
            preemptions=self._preemptions,
            swaps_out=self._swaps_out,
            swaps_in=self._swaps_in,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_swapped=len(self.swapped),
        )


def _request_order(request: Request) -> tuple[int, int]:
    return request.order


def _seq_order(seq: Sequence) -> tuple[int, int, int]:
    return (*seq.request.order, seq.index)


def _reset_for_recompute(seq: Sequence) -> None:
    """Back to waiting with only its known tokens; placeholders in flight are dropped."""
    seq.status = SequenceStatus.WAITING
    seq.num_computed = 0
    seq.num_tokens = len(seq.token_ids)
    seq.on_worker = False


def _fork_again_if_nothing_sampled(request: Request) -> None:
    """A forked request reset before the forking step's tokens arrived has n copies of the prompt and
    nothing else: recompute the prompt once and fork anew. (Sharing the full prompt blocks, as after a
    later preemption, would leave a block-aligned prompt no token to compute for the logits.)"""
    if request.params.n > 1 and request.forked and all(seq.num_output_tokens == 0 for seq in request.seqs):
        request.forked = False
