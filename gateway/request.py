"""A generation request and its n sequences, as the scheduler tracks them.

Priority convention (as in vLLM): a LOWER `priority` value is more important. The scheduler serves
lower values first and preempts the highest value, latest arrival first. The HTTP `priority` field
carries the same integer.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import msgspec

from paged.shared.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not holding device blocks: new, or preempted by recompute
    RUNNING = "running"  # holding device blocks, in the running batch
    SWAPPED = "swapped"  # blocks in the host pool; the worker keeps its state
    # On a prefill worker, its KV on the way to a decode worker: it keeps its blocks (they are
    # being read) but is not scheduled; gateway/handoff.py moves it on, or back to waiting.
    TRANSFERRING = "transferring"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """One of a request's n continuations. `token_ids` holds the known tokens; `num_tokens` also
    counts placeholders: tokens already scheduled to be sampled whose ids arrive with the step's
    result (overlapped scheduling keeps at most a couple in flight)."""

    seq_id: int
    index: int
    request: Request
    sampling: SamplingParams  # child k of a seeded request samples with seed + k
    token_ids: list[int]
    num_tokens: int
    max_num_tokens: int = 0  # min(prompt + max_tokens, max_model_len); set on admission to a scheduler
    num_computed: int = 0  # tokens whose KV is in the cache or being computed by a step in flight
    block_waits: int = 0  # steps in a row it waited for a free block (step_planner.py)
    computed_high_water: int = 0  # most tokens computed before its last recompute preemption: below it, work is done again
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    on_worker: bool = False  # the worker holds state for it (a NewSequence or fork was sent)
    ignore_results_until: int = -1  # results of steps with id <= this are stale (recompute preemption)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full known blocks

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_token_ids) :]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0  # lower is more important
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(init=False)
    stop_token_ids: frozenset[int] = field(init=False)  # eos (unless ignore_eos) and stop_token_ids
    wants_logprobs: bool = field(init=False)  # each result's logprobs go into its delta
    # The n-1 children exist: forked when the prompt's last chunk is scheduled, or from the start when
    # n == 1 (none to fork), so a decode step tests this flag alone.
    forked: bool = field(init=False)
    # After a recompute preemption of a forked request: the live sequences, all but the first, that
    # wait for the first to recompute the full prompt blocks and then share them (sequence_groups.py).
    awaiting_shared_prompt: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    kv_transfer_failed: bool = False  # a hand-off to a decode worker failed: it finishes where it is
    times_bypassed: int = 0  # requests admitted past it while it headed the waiting queue (backfill)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    waiting_tokens: int = 0  # tokens it adds to the waiting queue's total while it waits
    order: tuple[int, int] = (0, 0)  # (priority under the priority policy else 0, arrival number)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.forked = self.params.n == 1
        self.seqs = []
        for index in range(self.params.n):
            sampling = self.params
            if index and seed is not None:
                sampling = msgspec.structs.replace(self.params, seed=seed + index)
            tokens = list(self.prompt_token_ids)
            self.seqs.append(Sequence(next(_seq_ids), index, self, sampling, tokens, len(tokens)))
        self.wants_logprobs = self.params.logprobs is not None
        stop = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop |= self.eos_token_ids
        self.stop_token_ids = frozenset(stop)

    def mark_scheduled(self, num_cached_tokens: int) -> None:
        """First admission to a running batch (a later one after a preemption changes nothing)."""
        if self.first_scheduled_time is None:
            self.first_scheduled_time = time.monotonic()
            self.num_cached_tokens = num_cached_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def live_seqs(self) -> list[Sequence]:
        """The sequences that exist and have not finished (only the first before the fork)."""
        seqs = self.seqs if self.forked else self.seqs[:1]
        return [seq for seq in seqs if seq.status is not SequenceStatus.FINISHED]

    @property
    def finished(self) -> bool:
        return all(seq.status is SequenceStatus.FINISHED for seq in self.seqs)
