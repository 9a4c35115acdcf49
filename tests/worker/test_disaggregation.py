"""Prefill on one Worker, decode on another: the prompt's KV pages travel over a real ZeroMQ transport
(ipc) as step items, exactly as the gateway will order them, and the decode worker then continues
the sequence with the same greedy tokens and logits as a worker that did everything itself, also
when it already holds a prefix of the prompt and only the rest is transferred."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from paged.shared.config import CacheConfig, KVSharingConfig, MiB, ModelConfig
from paged.shared.protocol import BlockCopy, KVReceive, KVSend, NewSequence, ScheduledSeq, StepInput, StepOutput, TransferFailure
from paged.worker.worker import Worker
from support.worker_steps import GREEDY, BlockAllocator, SeqPlan, run_plans

BLOCK_SIZE = 16
PROMPT_LEN = 100  # six full blocks and a partial one
NUM_DECODE = 12
ATOL = 1e-4  # as tests/worker/test_worker_invariance.py: batching and block placement move logits ~1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def workers(stories_dir: Path, ipc_dir: Path) -> Iterator[tuple[Worker, Worker]]:
    """A prefill worker and a decode worker, each with its own page pool and transfer endpoint."""
    made = [make_worker(stories_dir, f"ipc://{ipc_dir / name}") for name in ("prefill", "decode")]
    yield made[0], made[1]
    for worker in made:
        worker.close()


def make_worker(model: Path | None, transfer_endpoint: str | None) -> Worker:
    return Worker(
        ModelConfig(model=str(model) if model else None, device="cpu", attention_backend="torch"),
        CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory=4 * MiB, swap_space=0),
        max_num_batched_tokens=512,
        sharing=KVSharingConfig(kv_transfer_endpoint=transfer_endpoint, kv_transfer_timeout=5.0),
    )


def prompt_of(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()]


@dataclass
class Stepper:
    """Sends one worker numbered steps, as the gateway's step loop does."""

    worker: Worker
    step_id: int = 0
    transfers_done: set[int] = field(default_factory=set)
    transfers_failed: dict[int, str] = field(default_factory=dict)

    def step(self, **items: object) -> tuple[StepOutput, dict[int, torch.Tensor]]:
        output, logits = self.worker.execute_step_with_logits(StepInput(self.step_id, **items))  # type: ignore[arg-type]
        self.step_id += 1
        assert not output.errors, output.errors
        self.transfers_done.update(output.transfers_done)
        self.transfers_failed.update((f.transfer_id, f.reason) for f in output.transfers_failed)
        return output, logits

    def wait_transfer(self, transfer_id: int) -> None:
        """Empty steps that wait for transfers (StepInput.transfer_wait_s) until this one ended."""
        deadline = time.monotonic() + 30
        while transfer_id not in self.transfers_done | set(self.transfers_failed):
            assert time.monotonic() < deadline, f"transfer {transfer_id} never ended"
            self.step(transfer_wait_s=0.5)


def decode(
    stepper: Stepper, seq_id: int, num_tokens: int, table: list[int], allocator: BlockAllocator, count: int, known: int | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """Decode `count` tokens of a sequence whose first `num_tokens - 1` tokens are in the cache; the
    worker knows the first `known` entries of `table` (default: all), the first step sends the rest."""
    tokens, logits = [], []
    known = len(table) if known is None else known
    for _ in range(count):
        position = num_tokens - 1
        new_blocks = allocator.allocate(1) if position // BLOCK_SIZE == len(table) else []
        scheduled = ScheduledSeq(seq_id, position, 1, known, table[known:] + new_blocks)
        table += new_blocks
        known = len(table)
        output, step_logits = stepper.step(scheduled=[scheduled])
        tokens.append(output.results[0].token_id)
        logits.append(step_logits[seq_id])
        num_tokens += 1
    return tokens, logits


def prefill_and_send(
    prefill: Stepper, seq_id: int, prompt: list[int], table: list[int], transfer_id: int, peer: str, send_from: int
) -> int:
    """Prefill in two chunks; the last chunk's step also sends blocks table[send_from:] to `peer`
    (a send runs after the step's forward pass, so it carries the pages that step computed)."""
    split = 4 * BLOCK_SIZE
    prefill.step(
        new_seqs=[NewSequence(seq_id, prompt, GREEDY)],
        scheduled=[ScheduledSeq(seq_id, 0, split, 0, table[:4], sample=False)],
    )
    output, _ = prefill.step(
        scheduled=[ScheduledSeq(seq_id, split, len(prompt) - split, 4, table[4:])],
        kv_sends=[KVSend(transfer_id, seq_id, peer, table[send_from:])],
    )
    return output.results[0].token_id


def continue_on_decode(
    decode_side: Stepper, seq_id: int, prompt: list[int], first_token: int, table: list[int], allocator: BlockAllocator
) -> tuple[list[int], list[torch.Tensor]]:
    """What the gateway sends the decode worker once the transfer is done: the sequence with its
    first token, then decodes; the first decode step carries the whole block table as its delta."""
    decode_side.step(new_seqs=[NewSequence(seq_id, [*prompt, first_token], GREEDY, num_output_tokens=1)])
    return decode(decode_side, seq_id, len(prompt) + 1, list(table), allocator, NUM_DECODE, known=0)


def reference(worker: Worker, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Everything on one worker: the first token and NUM_DECODE more, with their logits."""
    run = run_plans(worker, [SeqPlan(0, prompt, num_decode=NUM_DECODE)], BlockAllocator(worker.num_blocks))[0]
    return run.tokens, run.logits


def assert_same(actual: tuple[list[int], list[torch.Tensor]], expected: tuple[list[int], list[torch.Tensor]]) -> None:
    assert actual[0] == expected[0]
    for a, e in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=0)


def test_prefill_here_decode_there_matches_one_worker(workers: tuple[Worker, Worker]) -> None:
    prefill_worker, decode_worker = workers
    prompt = prompt_of(PROMPT_LEN, prefill_worker.arch.vocab_size)
    expected = reference(prefill_worker, prompt)

    prefill, decode_side = Stepper(prefill_worker), Stepper(decode_worker)
    num_blocks = -(-PROMPT_LEN // BLOCK_SIZE)
    prefill_table = BlockAllocator(prefill_worker.num_blocks, shuffle_seed=1).allocate(num_blocks)
    decode_allocator = BlockAllocator(decode_worker.num_blocks, shuffle_seed=2)
    decode_table = decode_allocator.allocate(num_blocks)
    # The gateway orders the receive as it schedules the last prefill chunk; the two steps race.
    decode_side.step(kv_receives=[KVReceive(7, decode_table)])
    first_token = prefill_and_send(prefill, 1, prompt, prefill_table, 7, decode_worker.transfer_endpoint, 0)
    decode_side.wait_transfer(7)
    prefill.wait_transfer(7)
    assert (decode_side.transfers_done, prefill.transfers_done) == ({7}, {7})
    prefill.step(freed_seq_ids=[1])  # only now may the prefill side reuse those blocks

    tokens, logits = continue_on_decode(decode_side, 1, prompt, first_token, decode_table, decode_allocator)
    assert_same(([first_token, *tokens], [expected[1][0], *logits]), expected)


def test_decode_side_prefix_hit_transfers_only_the_rest(workers: tuple[Worker, Worker]) -> None:
    """The decode worker computed the prompt's first three blocks for an earlier request (a prefix
    cache hit): only the other four blocks travel."""
    prefill_worker, decode_worker = workers
    prompt = prompt_of(PROMPT_LEN, prefill_worker.arch.vocab_size, seed=3)
    expected = reference(prefill_worker, prompt)
    decode_side = Stepper(decode_worker)
    decode_allocator = BlockAllocator(decode_worker.num_blocks, shuffle_seed=4)
    cached = decode_allocator.allocate(3)
    earlier = [*prompt[: 3 * BLOCK_SIZE], 7, 8, 9]  # shares exactly three blocks with the prompt
    decode_side.step(
        new_seqs=[NewSequence(5, earlier, GREEDY)],
        scheduled=[ScheduledSeq(5, 0, len(earlier), 0, [*cached, *decode_allocator.allocate(1)])],
    )
    decode_side.step(freed_seq_ids=[5])  # finished; its full blocks stay in the prefix cache

    prefill = Stepper(prefill_worker)
    num_blocks = -(-PROMPT_LEN // BLOCK_SIZE)
    prefill_table = BlockAllocator(prefill_worker.num_blocks, shuffle_seed=5).allocate(num_blocks)
    received = decode_allocator.allocate(num_blocks - 3)
    decode_side.step(kv_receives=[KVReceive(8, received)])
    first_token = prefill_and_send(prefill, 1, prompt, prefill_table, 8, decode_worker.transfer_endpoint, 3)
    decode_side.wait_transfer(8)
    assert decode_side.transfers_done == {8}

    tokens, logits = continue_on_decode(decode_side, 1, prompt, first_token, [*cached, *received], decode_allocator)
    assert_same(([first_token, *tokens], [expected[1][0], *logits]), expected)


@pytest.fixture
def builtin_workers(ipc_dir: Path) -> Iterator[tuple[Worker, Worker]]:
    made = [make_worker(None, f"ipc://{ipc_dir / 'a'}"), make_worker(None, None)]
    yield made[0], made[1]
    for worker in made:
        worker.close()


def test_a_send_fails_with_its_sequence_and_a_worker_without_endpoint_refuses(builtin_workers: tuple[Worker, Worker]) -> None:
    worker, no_endpoint = builtin_workers
    # Sequence 2 asks for more tokens than it has: it fails this step, so its pages are garbage.
    output = worker.execute_step(
        StepInput(
            0,
            new_seqs=[NewSequence(1, [1, 2, 3], GREEDY), NewSequence(2, [1, 2, 3], GREEDY)],
            scheduled=[ScheduledSeq(1, 0, 3, 0, [0]), ScheduledSeq(2, 0, 9, 0, [1])],
            kv_sends=[KVSend(20, 2, "ipc:///nowhere", [1])],
        )
    )
    assert [r.seq_id for r in output.results] == [1] and [e.seq_id for e in output.errors] == [2]
    assert output.transfers_failed == [TransferFailure(20, f"sequence 2 failed: {output.errors[0].message}")]
    assert no_endpoint.transfer_endpoint == ""
    output = no_endpoint.execute_step(StepInput(0, kv_receives=[KVReceive(21, [0])]))
    assert output.transfers_failed == [TransferFailure(21, "this worker has no KV transfer endpoint")]


def test_transfers_of_a_step_that_fails_before_its_forward_are_reported_failed(builtin_workers: tuple[Worker, Worker]) -> None:
    worker, _ = builtin_workers
    # A store load on a worker without a store fails the whole step before anything runs.
    step = StepInput(
        0, store_loads=[BlockCopy(0, 1)], kv_receives=[KVReceive(30, [0])], kv_sends=[KVSend(31, 9, "ipc:///x", [2])]
    )
    output = worker.execute_step(step)
    assert [f.transfer_id for f in output.transfers_failed] == [30, 31]
    assert all("this worker has no KV store" in f.reason for f in output.transfers_failed)
