"""Building one step's StepInput: the deltas the worker needs, never more.

The worker keeps each live sequence's tokens and block table (shared/protocol.py), so the
scheduler keeps a mirror of what the worker knows (`WorkerMirror`): which sequences it holds
(`Sequence.on_worker`: a NewSequence or fork was sent), which it must drop next step, and which
fork copies it must make next step. A step then carries only new sequences, the tokens to compute
and the blocks appended to each table.

Placeholders: a step that samples a sequence counts the sampled token at once (num_tokens += 1),
so that the next step, scheduled before this one's result arrives (overlapped scheduling), can
already send the decode of a token only the worker knows yet.

Result fencing: a sequence preempted by recompute is reset to its known tokens, so results of
steps already sent for its old state must be ignored: `fence_results` marks them stale, and the
output processor skips stale results (`is_stale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.block_hash import BlockHash
from paged.gateway.request import Sequence
from paged.shared.protocol import BlockCopy, NewSequence, ScheduledSeq, StepInput


def fence_results(seq: Sequence, last_stale_step_id: int) -> None:
    """Results for `seq` of steps up to `last_stale_step_id` belong to a dropped state."""
    seq.ignore_results_until = last_stale_step_id


def is_stale(seq: Sequence, step_id: int) -> bool:
    return step_id <= seq.ignore_results_until


def is_empty(step: StepInput) -> bool:
    """Nothing for the worker to do: the step is answered without being sent."""
    return not (
        step.scheduled or step.new_seqs or step.freed_seq_ids or step.swap_out or step.swap_in or step.copies
        or step.store_saves or step.store_loads
        or step.kv_sends or step.kv_receives or step.kv_cancels or step.transfer_wait_s
    )  # fmt: skip


@dataclass(slots=True)
class StepBuilder:
    """One step while the scheduler decides it; `budget` is the token budget left."""

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
    short_of_blocks: bool = False  # a running sequence waits for a block this step (step_planner.py)
    num_computed: int = 0  # tokens the worker computes in this step
    num_recomputed: int = 0  # of which computed before, by a sequence since preempted by recompute
    # Hashes of the full blocks this step's items complete: a waiting request whose prompt continues
    # with one of them waits for the next step, where it is a prefix hit (step_planner.py).
    completing: set[BlockHash] = field(default_factory=set)

    @property
    def out_of_blocks(self) -> bool:
        """The pool ran short this step: nothing new is admitted or swapped in."""
        return self.preempted or self.short_of_blocks

    def emit(self, allocator: BlockAllocator, seq: Sequence, num_new: int, copies: list[BlockCopy]) -> None:
        """Schedule `num_new` tokens of `seq` (its blocks already taken): the table delta, a
        NewSequence if the worker does not know it, and the placeholder of a sampled token."""
        start = seq.num_computed
        computed = seq.num_computed = start + num_new
        if num_new > 1:  # a prompt chunk (a decode's block is no other prompt's prefix worth waiting for)
            self.completing.update(allocator.completed_hashes(seq, start, computed))
        self.num_computed += num_new
        if start < seq.computed_high_water:
            self.num_recomputed += min(computed, seq.computed_high_water) - start
        seq_id = seq.seq_id
        table_from, new_blocks = allocator.take_table_delta(seq)
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
                self.forks.append(seq)
        if not seq.on_worker:
            self.new_seqs[seq_id] = NewSequence(seq_id, list(seq.token_ids), seq.sampling, seq.num_output_tokens)
            seq.on_worker = True
        self.scheduled[seq_id] = scheduled
        if copies:
            self.copies[seq_id] = copies
        self.budget -= num_new

    def unschedule(self, seq: Sequence) -> None:
        """Take back what emit() did for `seq` in this step (it is being preempted)."""
        scheduled = self.scheduled.pop(seq.seq_id, None)
        if scheduled is None:
            return
        self.copies.pop(seq.seq_id, None)
        self.budget += scheduled.num_tokens
        self.num_computed -= scheduled.num_tokens
        if scheduled.start < seq.computed_high_water:
            self.num_recomputed -= min(scheduled.start + scheduled.num_tokens, seq.computed_high_water) - scheduled.start
        seq.num_computed = scheduled.start
        if scheduled.sample:
            seq.num_tokens -= 1
        if scheduled.fork_ids:
            self.forks.remove(seq)
        if self.new_seqs.pop(seq.seq_id, None) is not None:
            seq.on_worker = False


class WorkerMirror:
    """What the worker knows and must be told with the next step."""

    def __init__(self) -> None:
        self.freed_seq_ids: list[int] = []  # sequences it holds that it must drop
        self.fork_copies: list[BlockCopy] = []  # copies reading KV the previous step computed
        self._next_step_id = 0

    def drop(self, seq: Sequence) -> None:
        """The sequence's worker state is void (finished, aborted, preempted by recompute)."""
        if seq.on_worker:
            self.freed_seq_ids.append(seq.seq_id)
            seq.on_worker = False

    def begin_step(self, budget: int) -> StepBuilder:
        step = StepBuilder(self._next_step_id, budget, fork_copies=self.fork_copies)
        self.fork_copies = []
        self._next_step_id += 1
        return step

    def finish_step(self, step: StepBuilder) -> StepInput:
        copies = step.fork_copies + [copy for seq_copies in step.copies.values() for copy in seq_copies]
        freed, self.freed_seq_ids = self.freed_seq_ids, []
        return StepInput(
            step_id=step.step_id,
            scheduled=list(step.scheduled.values()),
            new_seqs=list(step.new_seqs.values()),
            freed_seq_ids=freed,
            swap_out=step.swap_out,
            swap_in=step.swap_in,
            copies=copies,
        )

    @property
    def has_news(self) -> bool:
        return bool(self.freed_seq_ids)
