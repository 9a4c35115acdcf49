"""n > 1 requests: the fork, the shared prompt after a recompute, and seat accounting.

A request with n sequences runs its first sequence alone until its prompt's last chunk is
scheduled; the other n - 1 (children) are forked from it after that step (the worker copies the
parent's state and each child samples its own first token from the same logits). Paged, a child
shares the parent's whole table and copy-on-write gives it its own copy of a shared partial block
when first written (KVCacheManager.grow); contiguous, it takes a run reserved at admission and the
worker copies the prompt into it in the next step.

After a recompute preemption a forked request has lost the prompt blocks its sequences shared;
admitted each with a copy of its own it could need more than the whole pool and never run again.
So only its first live sequence takes blocks at admission, and the others wait for it to
recompute the full prompt blocks and then share them (`attach_awaiting`), which keeps the request
within the peak admission checked.
"""

from __future__ import annotations

from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.policy_queues import PolicyQueues
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.shared.protocol import BlockCopy


def reset_for_recompute(seq: Sequence) -> None:
    """Back to waiting with only its known tokens; placeholders in flight are dropped. What it had
    computed (steps in flight included) is computed again later: its high-water mark remembers it."""
    seq.computed_high_water = max(seq.computed_high_water, seq.num_computed)
    seq.status = SequenceStatus.WAITING
    seq.num_computed = 0
    seq.num_tokens = len(seq.token_ids)
    seq.on_worker = False
    seq.block_waits = 0


def fork_again_if_nothing_sampled(request: Request) -> None:
    """A forked request reset before the forking step's tokens arrived has n copies of the prompt and
    nothing else: recompute the prompt once and fork anew. (Sharing the full prompt blocks, as after a
    later preemption, would leave a block-aligned prompt no token to compute for the logits.)"""
    if request.params.n > 1 and request.forked and all(seq.num_output_tokens == 0 for seq in request.seqs):
        request.forked = False


class SequenceGroups:
    def __init__(self, allocator: BlockAllocator, queues: PolicyQueues) -> None:
        self.allocator = allocator
        self.queues = queues
        self.awaiting: list[Request] = []  # running requests with sequences awaiting a recomputed prompt
        # Seats kept for requests in a KV hand-off (gateway/handoff.py): on a prefill worker, those it
        # sends (they come back if the transfer fails); on a decode worker, those coming in.
        self.transfer_seats = 0

    def seats_taken(self) -> int:
        """Running sequences, counting the children that running n > 1 requests will fork, the
        sequences waiting to share a recomputed prompt and the ones in a KV hand-off."""
        running = self.queues.running
        return (
            len(running)
            + self.transfer_seats
            + sum(seq.request.params.n - 1 for seq in running if seq.index == 0 and not seq.request.forked)
            + sum(len(request.awaiting_shared_prompt) for request in self.awaiting)
        )

    def split_for_admission(self, request: Request, seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences to admit now, sequences to await the recomputed prompt blocks)."""
        if request.forked and len(seqs) > 1 and self.allocator.shared_prompt_blocks(request.num_prompt_tokens):
            return seqs[:1], seqs[1:]
        return seqs, []

    def await_shared_prompt(self, request: Request, seqs: list[Sequence]) -> None:
        request.awaiting_shared_prompt = seqs
        self.awaiting.append(request)

    def attach_awaiting(self) -> None:
        """Sequences awaiting a recomputed prompt share its full blocks once a step that computes
        them has been built (the worker runs steps in order), and compute their own tokens from the
        next step on, as children do after a fork."""
        block_size = self.allocator.block_size
        still_awaiting = []
        for request in self.awaiting:
            source = request.live_seqs()[0]
            num_blocks = self.allocator.shared_prompt_blocks(request.num_prompt_tokens)
            if source.num_computed < num_blocks * block_size:
                still_awaiting.append(request)
                continue
            for seq in request.awaiting_shared_prompt:
                self.allocator.share_prefix(source, seq, num_blocks)
                seq.num_computed = num_blocks * block_size
                self.queues.add_running(seq)
            request.awaiting_shared_prompt = []
        self.awaiting = still_awaiting

    def stop_awaiting(self, request: Request) -> list[Sequence]:
        """Forget a request's sequences awaiting its recomputed prompt (it is preempted or ends)."""
        awaiting = request.awaiting_shared_prompt
        if awaiting:
            request.awaiting_shared_prompt = []
            self.awaiting.remove(request)
        return awaiting

    def fork(self, parent: Sequence) -> tuple[list[Sequence], list[BlockCopy]]:
        """The children of `parent`'s request join the running batch, holding the parent's tokens and
        table. Returns them and the copies the worker must make in the NEXT step (contiguous only:
        they read KV the forking step computes)."""
        request = parent.request
        request.forked = True
        children = request.seqs[1:]
        copies: list[BlockCopy] = []
        for child in children:
            copies += self.allocator.fork(parent, child)
            child.num_computed = parent.num_computed
            child.num_tokens = parent.num_tokens
            child.on_worker = True
            self.queues.add_running(child)
        return children, copies

    def forget_all(self) -> None:
        for request in self.awaiting:
            request.awaiting_shared_prompt = []
        self.awaiting.clear()
