"""A minimal stand-in for the gateway's scheduler, for driving a Worker by hand in tests.

It allocates blocks from a free list (in order, or shuffled so that block tables are non-contiguous),
splits each prompt into prefill chunks of a chosen size, then decodes, and builds the StepInputs with
the same deltas the real scheduler sends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from paged.shared.protocol import BlockCopy, NewSequence, ScheduledSeq, StepInput
from paged.shared.sampling_params import SamplingParams
from paged.worker.worker import Worker

GREEDY = SamplingParams(temperature=0.0)


class BlockAllocator:
    def __init__(self, num_blocks: int, shuffle_seed: int | None = None) -> None:
        self.free = list(range(num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.free)
        self.free.reverse()  # pop() hands out the front of the order

    def allocate(self, count: int) -> list[int]:
        return [self.free.pop() for _ in range(count)]


@dataclass
class SeqPlan:
    """Prefill `prompt` in chunks of `chunk_size` (0: all at once), then decode `num_decode` tokens.
    The sequence joins the batch at step `first_step`."""

    seq_id: int
    prompt: list[int]
    chunk_size: int = 0
    num_decode: int = 4
    first_step: int = 0
    sampling: SamplingParams = GREEDY
    fork_ids: list[int] = field(default_factory=list)  # forked at the end of the prefill


@dataclass
class SeqRun:
    """What one planned sequence produced: the logits it sampled from at each sampling step, and its tokens."""

    logits: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def run_plans(worker: Worker, plans: list[SeqPlan], allocator: BlockAllocator) -> dict[int, SeqRun]:
    """Step the worker until every plan (and every fork) has sampled prefill + num_decode tokens."""
    runs: dict[int, SeqRun] = {}
    computed: dict[int, int] = {}  # tokens in the KV cache
    known: dict[int, int] = {}  # tokens the worker knows (prompt + sampled)
    tables: dict[int, list[int]] = {}
    wanted: dict[int, int] = {}  # tokens to sample in total
    needs_copy_on_write: set[int] = set()
    step_id = 0
    last_join = max(plan.first_step for plan in plans)
    while step_id <= last_join or any(len(runs[seq_id].tokens) < wanted[seq_id] for seq_id in runs):
        new_seqs: list[NewSequence] = []
        scheduled: list[ScheduledSeq] = []
        copies: list[BlockCopy] = []
        for plan in plans:
            if plan.first_step == step_id:
                new_seqs.append(NewSequence(plan.seq_id, plan.prompt, plan.sampling))
                for seq_id in (plan.seq_id, *plan.fork_ids):
                    runs[seq_id], wanted[seq_id] = SeqRun(), plan.num_decode + 1
                computed[plan.seq_id], known[plan.seq_id], tables[plan.seq_id] = 0, len(plan.prompt), []
        for seq_id in list(computed):
            if len(runs[seq_id].tokens) >= wanted[seq_id]:
                continue
            plan = next((p for p in plans if p.seq_id == seq_id), None)
            remaining = known[seq_id] - computed[seq_id]
            num_tokens = min(remaining, plan.chunk_size) if plan is not None and plan.chunk_size else remaining
            end = computed[seq_id] + num_tokens
            table = tables[seq_id]
            table_from, new_blocks = len(table), []
            if seq_id in needs_copy_on_write:  # a fork's shared partial last block: give it its own copy
                needs_copy_on_write.discard(seq_id)
                table_from -= 1
                new_blocks = allocator.allocate(1)
                copies.append(BlockCopy(table[-1], new_blocks[0]))
            new_blocks += allocator.allocate(-(-end // worker.block_size) - table_from - len(new_blocks))
            sample = end == known[seq_id]
            forks = plan.fork_ids if plan is not None and sample and not runs[seq_id].tokens else []
            scheduled.append(ScheduledSeq(seq_id, computed[seq_id], num_tokens, table_from, new_blocks, sample, forks))
            table[table_from:] = new_blocks
            computed[seq_id] = end
            for child in forks:
                computed[child], known[child], tables[child] = end, known[seq_id], list(table)
                if end % worker.block_size:
                    needs_copy_on_write.add(child)
        step = StepInput(step_id, scheduled=scheduled, new_seqs=new_seqs, copies=copies)
        output, logits = worker.execute_step_with_logits(step)
        assert not output.errors, output.errors
        for result in output.results:
            runs[result.seq_id].tokens.append(result.token_id)
            runs[result.seq_id].logits.append(logits[result.seq_id])
            known[result.seq_id] += 1
        step_id += 1
    return runs
