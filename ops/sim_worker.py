"""A simulated worker: executes StepInputs the way a real worker must, without a model.

It keeps each sequence's tokens and block table from the deltas, applies frees, store saves, swaps,
store loads and copies in protocol order, and "computes" a position by writing its token id into
the slot its table names. With `verify=True` it then checks that every slot the sequence reads
holds the right token, which catches wrong prefix-cache hits, missed copy-on-write copies, bad
swaps, bad saves or loads of the KV store tier, and stale tables. Workers given one `store` (a list
of slots) share it, as the workers of a host share its KV store arena. Sampled tokens come from a
seeded generator, or `choose_token(seq_id, position)` when given. With `verify=False` (benchmarks)
it keeps no state and only samples. Workers given one `SimulatedKVLink` (ops/sim_kv_link.py) move
KV pages to each other by the steps' transfer items; without one, every transfer fails as on a
worker without a transfer endpoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from paged.gateway.scheduler import Scheduler
from paged.gateway.step_pipeline import LocalStepLoop
from paged.ops.sim_kv_link import SimulatedKVLink
from paged.shared.protocol import SeqResult, StepInput, StepOutput, TransferFailure


class ProtocolViolation(AssertionError):
    pass


@dataclass(slots=True)
class _SeqState:
    tokens: list[int]
    table: list[int]
    num_computed: int


class SimulatedWorker:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        *,
        verify: bool = True,
        seed: int = 0,
        vocab_size: int = 100,
        choose_token: Callable[[int, int], int] | None = None,
        store: list[list[int | None]] | None = None,
        kv_link: SimulatedKVLink | None = None,
    ) -> None:
        self.block_size = block_size
        self.store = store if store is not None else []
        self.kv_link = kv_link
        self.verify = verify
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)] if verify else []
        self.host: list[list[int | None]] = [[None] * block_size for _ in range(num_host_blocks)] if verify else []
        self.seqs: dict[int, _SeqState] = {}
        self._rng = random.Random(seed)
        self._vocab_size = vocab_size
        self._choose_token = choose_token
        self.num_tokens_computed = 0

    def _sample(self, seq_id: int, position: int) -> int:
        if self._choose_token is not None:
            return self._choose_token(seq_id, position)
        return self._rng.randrange(self._vocab_size)

    def execute(self, step: StepInput) -> StepOutput:
        for transfer_id in step.kv_cancels:
            if self.kv_link is not None:
                self.kv_link.cancel(self, transfer_id)
        output = self._sample_only(step) if not self.verify else self._execute(step)
        self._transfer(step, output)
        return output

    def _transfer(self, step: StepInput, output: StepOutput) -> None:
        """Receives are registered before the forward pass and sends start after it; as the simulated
        forward is instant, both happen here, after the tokens are written."""
        link = self.kv_link
        if link is None:
            output.transfers_failed = [
                TransferFailure(item.transfer_id, "this worker has no KV transfer endpoint")
                for item in (*step.kv_receives, *step.kv_sends)
            ]
            return
        for receive in step.kv_receives:
            link.receive(self, receive)
        for send in step.kv_sends:
            link.send(self, send)
        output.transfers_done, output.transfers_failed = link.take_finished(self)

    def _execute(self, step: StepInput) -> StepOutput:
        for seq_id in step.freed_seq_ids:
            self.seqs.pop(seq_id, None)
        for copy in step.store_saves:
            self.store[copy.dst] = list(self.device[copy.src])
        for copy in step.swap_out:
            self.host[copy.dst] = list(self.device[copy.src])
        for copy in step.swap_in:
            self.device[copy.dst] = list(self.host[copy.src])
        for copy in step.store_loads:
            self.device[copy.dst] = list(self.store[copy.src])
        for copy in step.copies:
            self.device[copy.dst] = list(self.device[copy.src])
        for new in step.new_seqs:
            if new.seq_id in self.seqs:
                raise ProtocolViolation(f"new sequence {new.seq_id} already exists")
            self.seqs[new.seq_id] = _SeqState(list(new.token_ids), [], -1)
        results = []
        forks = []
        size = self.block_size
        for scheduled in step.scheduled:
            state = self.seqs.get(scheduled.seq_id)
            if state is None:
                raise ProtocolViolation(f"step {step.step_id} schedules unknown sequence {scheduled.seq_id}")
            if scheduled.table_from > len(state.table):
                raise ProtocolViolation(f"seq {scheduled.seq_id}: table_from beyond its table")
            del state.table[scheduled.table_from :]
            state.table.extend(scheduled.new_blocks)
            if state.num_computed < 0:  # first step after NewSequence: prefix-cache hits precede start
                state.num_computed = scheduled.start
            if scheduled.start != state.num_computed:
                raise ProtocolViolation(
                    f"seq {scheduled.seq_id}: start {scheduled.start}, worker has computed {state.num_computed}"
                )
            end = scheduled.start + scheduled.num_tokens
            if end > len(state.tokens):
                raise ProtocolViolation(f"seq {scheduled.seq_id}: computes position {end - 1} of unknown token")
            if len(state.table) * size < end:
                raise ProtocolViolation(f"seq {scheduled.seq_id}: {len(state.table)} blocks for {end} tokens")
            for position in range(scheduled.start, end):
                self.device[state.table[position // size]][position % size] = state.tokens[position]
            for position in range(end):
                slot = self.device[state.table[position // size]][position % size]
                if slot != state.tokens[position]:
                    raise ProtocolViolation(
                        f"seq {scheduled.seq_id}: position {position} reads token {slot}, "
                        f"expected {state.tokens[position]} (block {state.table[position // size]})"
                    )
            state.num_computed = end
            self.num_tokens_computed += scheduled.num_tokens
            if scheduled.sample:
                if end != len(state.tokens):
                    raise ProtocolViolation(f"seq {scheduled.seq_id}: samples before the end of its tokens")
                for child_id in scheduled.fork_ids:
                    forks.append((child_id, state))
                token = self._sample(scheduled.seq_id, end)
                results.append(SeqResult(scheduled.seq_id, token))
                state.tokens.append(token)
            elif scheduled.fork_ids:
                raise ProtocolViolation(f"seq {scheduled.seq_id}: forks without sampling")
        for child_id, parent in forks:
            tokens = parent.tokens[:-1]
            token = self._sample(child_id, len(tokens))
            tokens.append(token)
            self.seqs[child_id] = _SeqState(tokens, list(parent.table), parent.num_computed)
            results.append(SeqResult(child_id, token))
        return StepOutput(step.step_id, results=results)

    def _sample_only(self, step: StepInput) -> StepOutput:
        """The fast path for benchmarks: no state, positions come from the step itself."""
        sample = self._sample
        results = []
        computed = 0
        for scheduled in step.scheduled:
            computed += scheduled.num_tokens
            if scheduled.sample:
                position = scheduled.start + scheduled.num_tokens
                results.append(SeqResult(scheduled.seq_id, sample(scheduled.seq_id, position)))
                for child_id in scheduled.fork_ids:
                    results.append(SeqResult(child_id, sample(child_id, position)))
        self.num_tokens_computed += computed
        return StepOutput(step.step_id, results=results)


class StepLoop(LocalStepLoop):
    """The step pipeline against a simulated worker, as the server drives a real one: `overlapped`
    keeps two steps in flight (schedule() for step N+1 runs before update() for step N)."""

    def __init__(self, scheduler: Scheduler, worker: SimulatedWorker, *, overlapped: bool = True) -> None:
        super().__init__(scheduler, worker.execute, depth=2 if overlapped else 1)
        self.worker = worker
