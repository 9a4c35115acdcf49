"""Preemption: which running request gives way when a sequence cannot get a block, or when a more
important request waits (priority policy), and how it gives way.

The victim is always the tail of the running batch: the least important, latest-arrived request,
preempted whole (an n > 1 request with all its sequences). Since victims are the latest arrivals,
the oldest running request can always take the whole pool and finish: admitted work is never
stuck waiting or preempting itself.

Recompute frees the victim's blocks and puts it back in the waiting queue at its arrival's place
(its prompt and generated tokens are recomputed later, mostly from the prefix cache); swap copies
its blocks to the host pool and brings them back before any new admission once memory frees. Swap
falls back to recompute when the host pool is short or the step forbids it. `auto` chooses per
victim whichever costs less (`cheaper_mode`).

Preemption is the last resort. Predictive admission (gateway/admission.py) stops admitting before
the pool runs short; a sequence that needs a block first takes a free one, then a cached-free one
(evicting its content: BlockPool.allocate); when neither is left it waits a few steps for a finishing
sequence to free some (predictive admission: step_planner.py), and only then is the tail preempted.
"""

from __future__ import annotations

from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.policy_queues import PolicyQueues
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.gateway.sequence_groups import SequenceGroups, fork_again_if_nothing_sampled, reset_for_recompute
from paged.gateway.stats import SchedulerCounters
from paged.gateway.step_builder import StepBuilder, WorkerMirror, fence_results
from paged.shared.config import PreemptionMode

# Auto mode's exchange rate: copying a token's KV to the host and back costs about half as much as
# computing it again. (A 7B fp16 model: 0.5 MiB of KV per token, 40 us over PCIe both ways against
# ~50 us of prefill per token on one GPU; less with GQA; a CPU worker copies far cheaper than it computes.)
SWAP_COST_PER_TOKEN = 0.5


def cheaper_mode(tokens_lost: int, blocks_to_copy: int, block_size: int) -> PreemptionMode:
    """Recompute costs the tokens whose blocks would be lost (shared blocks stay cached for the
    prefix cache to serve); swap costs copying every block out and back."""
    return "swap" if blocks_to_copy * block_size * SWAP_COST_PER_TOKEN < tokens_lost else "recompute"


class Preemption:
    def __init__(
        self,
        allocator: BlockAllocator,
        queues: PolicyQueues,
        groups: SequenceGroups,
        mirror: WorkerMirror,
        counters: SchedulerCounters,
    ) -> None:
        self.allocator = allocator
        self.queues = queues
        self.groups = groups
        self.mirror = mirror
        self.counters = counters

    def victim(self) -> Request:
        """The request to preempt next: the tail of the running batch."""
        return self.queues.running[-1].request

    def may_preempt_for(self, request: Request) -> bool:
        """Under the priority policy a waiting request may take the blocks of a less important one."""
        queues = self.queues
        return queues.by_priority and bool(queues.running) and self.victim().order[0] > request.order[0]

    def preempt(self, request: Request, step: StepBuilder, mode: PreemptionMode) -> None:
        """Preempt a whole request, whose sequences sit at the tail of the running batch."""
        step.preempted = True
        self.counters.preemptions += 1
        request.num_preemptions += 1
        seqs = self.queues.pop_running_request(request) + self.groups.stop_awaiting(request)
        if mode == "auto":
            mode = self._cheaper_mode(seqs)
        # The worker runs a step's swap-outs before its swap-ins and copies. So swap only sequences
        # it knows that have no work (and no copy-on-write copy) in this step, and never in a step
        # that swaps in: its host blocks, just freed, may not be overwritten before they are read.
        can_swap = mode == "swap" and not step.swap_in and all(seq.on_worker and seq.seq_id not in step.scheduled for seq in seqs)
        for seq in seqs:
            step.unschedule(seq)
            seq.block_waits = 0
        copies = self.allocator.swap_out(seqs) if can_swap else None
        if copies is not None:
            step.swap_out.extend(copies)
            self.counters.swaps_out += len(copies)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.queues.push_swapped(request)
            return
        for seq in seqs:
            self.allocator.free(seq)
            self.mirror.drop(seq)
            reset_for_recompute(seq)
            # Results of steps already sent for it belong to the dropped state. Not this step's: the
            # priority policy may admit it again within the step being built.
            fence_results(seq, step.step_id - 1)
        fork_again_if_nothing_sampled(request)
        self.queues.push_waiting(request)

    def _cheaper_mode(self, seqs: list[Sequence]) -> PreemptionMode:
        allocator = self.allocator
        tables = allocator.seqs
        held = [seq for seq in seqs if seq.seq_id in tables]
        exclusive = allocator.exclusive_blocks(held)
        size = allocator.block_size
        # Of each sequence's computed tokens, the ones in blocks that only it holds are lost.
        lost = sum(min(seq.num_computed, blocks * size) for seq, blocks in zip(held, exclusive, strict=True))
        copied = len({block for seq in held for block in tables[seq.seq_id].table})
        return cheaper_mode(lost, copied, size)
