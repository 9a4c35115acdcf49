"""The worker computes the same thing however a sequence is scheduled (issue 2's proof).

A sequence's logits must not depend on how its prompt is chunked, on what else is in the batch, on
which physical blocks it gets, or on the block size. Tolerance: max abs difference 1e-4 on float32
logits of magnitude up to ~20 (observed: ~1e-5). Batching changes the padded shapes attention and the
matmuls reduce over, so bit-equality is not expected; a wrong slot, mask or block-table entry moves
logits by orders of magnitude more.

Also: greedy generation through the Worker equals transformers' greedy generate token for token, and
n > 1 greedy forks continue exactly as their parent does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import torch

from paged.shared.config import CacheConfig, ModelConfig, MiB
from paged.shared.protocol import BlockCopy, NewSequence, ScheduledSeq, StepInput
from paged.shared.sampling_params import SamplingParams
from support.worker_steps import GREEDY, BlockAllocator, SeqPlan, run_plans
from paged.worker.kv_cache import bytes_per_block
from paged.worker.worker import Worker

ATOL = 1e-4
STORIES_PROMPT = [1, 403, 407, 261, 378]  # BOS + "Once upon a time"


pytestmark = pytest.mark.usefixtures("single_thread")


WorkerFactory = Callable[[Path | None, int], Worker]


@pytest.fixture(scope="module", params=["cpu", "torch"])
def attention_backend(request: pytest.FixtureRequest) -> Literal["cpu", "torch"]:
    """Every test runs on the native CPU kernel (what a CPU worker uses) and on the torch reference path."""
    return request.param


@pytest.fixture
def make_worker(attention_backend: Literal["cpu", "torch"]) -> WorkerFactory:
    def make(model: Path | None, block_size: int) -> Worker:
        return Worker(
            ModelConfig(model=str(model) if model else None, device="cpu", attention_backend=attention_backend),
            CacheConfig(block_size=block_size, kv_cache_memory=8 * MiB, swap_space=64 * 1024),
            max_num_batched_tokens=512,
        )

    return make


@pytest.fixture(scope="module", params=["stories260K", "builtin"])
def model_dir(request: pytest.FixtureRequest) -> Path | None:
    if request.param == "builtin":
        return None
    return request.getfixturevalue("stories_dir")


def prompt_of(length: int, vocab_size: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()]


def assert_same_logits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=0, msg=lambda m: f"sampling step {step}: {m}")


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_logits_independent_of_chunking_batching_and_blocks(make_worker: WorkerFactory, model_dir: Path | None, block_size: int) -> None:
    worker = make_worker(model_dir, block_size)
    vocab_size = worker.arch.vocab_size
    prompt = prompt_of(45, vocab_size, seed=0)
    # Reference: alone, prefilled at once, on blocks 0, 1, 2, ...
    reference = run_plans(worker, [SeqPlan(0, prompt, num_decode=5)], BlockAllocator(worker.num_blocks))[0]

    for seq_id, chunk_size in enumerate([1, 7, 16], start=1):
        run = run_plans(worker, [SeqPlan(seq_id, prompt, chunk_size, num_decode=5)], BlockAllocator(worker.num_blocks))
        assert_same_logits(run[seq_id].logits, reference.logits)
        assert run[seq_id].tokens == reference.tokens

    # In a batch with others of different lengths, joining at different steps so that prefill chunks
    # and decodes mix, on shuffled blocks.
    others = [
        SeqPlan(11, prompt_of(30, vocab_size, seed=1), chunk_size=0, num_decode=12, first_step=0),
        SeqPlan(12, prompt_of(70, vocab_size, seed=2), chunk_size=16, num_decode=3, first_step=2),
        SeqPlan(13, prompt_of(3, vocab_size, seed=3), chunk_size=0, num_decode=9, first_step=4),
    ]
    batched = run_plans(
        worker,
        [*others, SeqPlan(10, prompt, chunk_size=7, num_decode=5, first_step=1)],
        BlockAllocator(worker.num_blocks, shuffle_seed=block_size),
    )
    assert_same_logits(batched[10].logits, reference.logits)
    assert batched[10].tokens == reference.tokens
    # And each companion matches itself run alone.
    for plan in others:
        alone = SeqPlan(plan.seq_id + 100, plan.prompt, num_decode=plan.num_decode)
        alone_run = run_plans(worker, [alone], BlockAllocator(worker.num_blocks))[alone.seq_id]
        assert_same_logits(batched[plan.seq_id].logits, alone_run.logits)


def test_logits_same_across_block_sizes(make_worker: WorkerFactory, model_dir: Path | None) -> None:
    runs = []
    for block_size in (1, 16, 32):
        worker = make_worker(model_dir, block_size)
        prompt = prompt_of(40, worker.arch.vocab_size, seed=5)
        plan = SeqPlan(0, prompt, chunk_size=16, num_decode=4)
        runs.append(run_plans(worker, [plan], BlockAllocator(worker.num_blocks, shuffle_seed=7))[0])
    for run in runs[1:]:
        assert_same_logits(run.logits, runs[0].logits)


def test_greedy_generation_matches_transformers(make_worker: WorkerFactory, stories_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_output = hf_model.generate(
            torch.tensor([STORIES_PROMPT]),
            do_sample=False,
            max_new_tokens=100,
            pad_token_id=0,
        )[0, len(STORIES_PROMPT) :].tolist()
    assert len(hf_output) == 100, "transformers stopped at EOS early; pick a prompt whose story runs 100 tokens"

    worker = make_worker(stories_dir, 16)
    plan = SeqPlan(0, STORIES_PROMPT, num_decode=99)
    run = run_plans(worker, [plan], BlockAllocator(worker.num_blocks, shuffle_seed=3))[0]
    assert run.tokens == hf_output


def test_greedy_forks_continue_like_parent(make_worker: WorkerFactory, model_dir: Path | None) -> None:
    worker = make_worker(model_dir, 16)
    prompt = prompt_of(21, worker.arch.vocab_size, seed=9)  # the fork point falls inside a block
    alone = run_plans(worker, [SeqPlan(0, prompt, num_decode=20)], BlockAllocator(worker.num_blocks))[0]
    runs = run_plans(worker, [SeqPlan(1, prompt, num_decode=20, fork_ids=[2, 3])], BlockAllocator(worker.num_blocks, 1))
    for seq_id in (1, 2, 3):
        assert runs[seq_id].tokens == alone.tokens
        assert_same_logits(runs[seq_id].logits, alone.logits)


def test_bad_sequence_fails_alone_and_worker_keeps_serving(make_worker: WorkerFactory, stories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(stories_dir, 16)
    greedy = NewSequence(1, STORIES_PROMPT, GREEDY)
    bad_token = NewSequence(2, [1, worker.arch.vocab_size], GREEDY)
    early_sample = NewSequence(5, STORIES_PROMPT, GREEDY)
    bad_block = NewSequence(6, STORIES_PROMPT, GREEDY)
    step = StepInput(
        0,
        new_seqs=[greedy, bad_token, early_sample, bad_block],
        scheduled=[
            ScheduledSeq(1, 0, len(STORIES_PROMPT), 0, [0]),
            ScheduledSeq(2, 0, 2, 0, [1]),
            ScheduledSeq(3, 0, 1, 0, [2]),  # never registered
            ScheduledSeq(5, 0, 3, 0, [3], sample=True),  # a sample mid-prompt would not be the next token
            ScheduledSeq(6, 0, len(STORIES_PROMPT), 0, [worker.num_blocks]),
        ],
    )
    output = worker.execute_step(step)
    assert [r.seq_id for r in output.results] == [1]
    assert sorted(e.seq_id for e in output.errors) == [2, 3, 5, 6]

    # A forward that raises (simulated kernel failure) fails the scheduled sequences, not the worker.
    def exploding_forward(*args: object) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(worker.model, "forward", exploding_forward)
    output = worker.execute_step(StepInput(1, scheduled=[ScheduledSeq(1, len(STORIES_PROMPT), 1, 1, [])]))
    assert output.results == [] and [e.seq_id for e in output.errors] == [1]
    assert "kernel exploded" in output.errors[0].message
    monkeypatch.undo()

    # State was left untouched by the failed step, so the same decode now succeeds.
    output = worker.execute_step(StepInput(2, scheduled=[ScheduledSeq(1, len(STORIES_PROMPT), 1, 1, [])]))
    assert not output.errors and [r.seq_id for r in output.results] == [1]

    # A sequence scheduled twice in one step is an error, and runs neither time.
    decode = ScheduledSeq(1, len(STORIES_PROMPT) + 1, 1, 1, [])
    output = worker.execute_step(StepInput(3, scheduled=[decode, decode]))
    assert output.results == [] and [e.seq_id for e in output.errors] == [1]


@pytest.mark.parametrize(
    "bad",
    [
        SamplingParams(logprobs=10**6),
        SamplingParams(logprobs=-1),
        SamplingParams(temperature=math.nan),
        SamplingParams(top_p=0.0),
        SamplingParams(min_p=2.0),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(presence_penalty=math.nan),
    ],
    ids=["logprobs-beyond-vocab", "logprobs-negative", "nan-temperature", "top-p-0", "min-p-2", "repetition-0", "nan-penalty"],
)
def test_sampling_values_the_worker_cannot_honour_fail_that_sequence_alone(make_worker: WorkerFactory, bad: SamplingParams) -> None:
    """Below the API's validation: such a sequence must not fail the batch's sampling for everyone."""
    worker = make_worker(None, 16)  # the built-in model: a byte vocabulary
    prompt = [1, 72, 105, 33]
    step = StepInput(
        0,
        new_seqs=[NewSequence(1, prompt, SamplingParams(temperature=0.7, seed=3, logprobs=2)), NewSequence(2, prompt, bad)],
        scheduled=[ScheduledSeq(1, 0, len(prompt), 0, [0]), ScheduledSeq(2, 0, len(prompt), 0, [1])],
    )
    output = worker.execute_step(step)
    assert [r.seq_id for r in output.results] == [1] and [e.seq_id for e in output.errors] == [2]


def test_logprobs_reported_only_when_asked(make_worker: WorkerFactory, stories_dir: Path) -> None:
    worker = make_worker(stories_dir, 16)
    plain = NewSequence(1, STORIES_PROMPT, GREEDY)
    with_logprobs = NewSequence(2, STORIES_PROMPT, SamplingParams(temperature=0.0, logprobs=3))
    output, logits = worker.execute_step_with_logits(
        StepInput(
            0,
            new_seqs=[plain, with_logprobs],
            scheduled=[ScheduledSeq(1, 0, 5, 0, [0]), ScheduledSeq(2, 0, 5, 0, [1])],
        )
    )
    by_id = {r.seq_id: r for r in output.results}
    assert by_id[1].logprob is None and by_id[1].top_logprobs is None
    expected = torch.log_softmax(logits[2], dim=-1)
    assert by_id[2].logprob == pytest.approx(expected[by_id[2].token_id].item(), abs=1e-5)
    assert [t.token_id for t in by_id[2].top_logprobs or []] == expected.topk(3).indices.tolist()


def test_swapped_out_and_back_sequence_continues_identically(make_worker: WorkerFactory, stories_dir: Path) -> None:
    """Swap a prefilled sequence's pages out, let another sequence overwrite them, swap them back into
    different blocks: its decode logits are those of an undisturbed run."""
    worker = make_worker(stories_dir, 16)
    prompt = prompt_of(40, worker.arch.vocab_size, seed=4)  # 3 blocks, the last one partial
    undisturbed = run_plans(worker, [SeqPlan(0, prompt, num_decode=1)], BlockAllocator(worker.num_blocks))[0]

    prefill = worker.execute_step(
        StepInput(0, new_seqs=[NewSequence(1, prompt, GREEDY)], scheduled=[ScheduledSeq(1, 0, 40, 0, [0, 1, 2])])
    )
    assert prefill.results[0].token_id == undisturbed.tokens[0]
    worker.execute_step(StepInput(1, swap_out=[BlockCopy(0, 2), BlockCopy(1, 0), BlockCopy(2, 1)]))
    intruder = prompt_of(48, worker.arch.vocab_size, seed=5)
    worker.execute_step(
        StepInput(2, new_seqs=[NewSequence(2, intruder, GREEDY)], scheduled=[ScheduledSeq(2, 0, 48, 0, [0, 1, 2])])
    )
    # Swapped back into blocks 5, 3, 4: the table is replaced wholesale (table_from=0).
    output, logits = worker.execute_step_with_logits(
        StepInput(
            3,
            swap_in=[BlockCopy(2, 5), BlockCopy(0, 3), BlockCopy(1, 4)],
            scheduled=[ScheduledSeq(1, 40, 1, 0, [5, 3, 4])],
        )
    )
    assert not output.errors
    assert_same_logits([logits[1]], undisturbed.logits[1:])


def test_pool_sizing(make_worker: WorkerFactory, stories_dir: Path) -> None:
    worker = make_worker(stories_dir, 16)
    per_block = bytes_per_block(worker.arch, 16, torch.float32)
    assert worker.num_blocks == 8 * MiB // per_block
    assert worker.num_host_blocks == 64 * 1024 // per_block
    assert worker.max_model_len == 512
    worker._profile_forward(600)  # the CUDA sizing pass, smoke-tested: sequences of 512 and 88 tokens
    with pytest.raises(ValueError, match="max_model_len"):
        Worker(ModelConfig(model=str(stories_dir)), CacheConfig(kv_cache_memory=per_block * 31))


def test_recomputed_sequence_resumes_where_it_left_off(make_worker: WorkerFactory, stories_dir: Path) -> None:
    """Recompute preemption: the sequence comes back as prompt + generated tokens (num_output_tokens
    marks the split) and is prefilled in chunks straddling that split; its next logits are unchanged."""
    worker = make_worker(stories_dir, 16)
    prompt = prompt_of(20, worker.arch.vocab_size, seed=6)
    reference = run_plans(worker, [SeqPlan(0, prompt, num_decode=6)], BlockAllocator(worker.num_blocks))[0]
    generated = reference.tokens[:4]
    resumed = NewSequence(1, prompt + generated, GREEDY, num_output_tokens=len(generated))
    first = worker.execute_step(
        StepInput(0, new_seqs=[resumed], scheduled=[ScheduledSeq(1, 0, 22, 0, [7, 3], sample=False)])
    )
    output, logits = worker.execute_step_with_logits(StepInput(1, scheduled=[ScheduledSeq(1, 22, 2, 2, [])]))
    assert not first.errors and not first.results and not output.errors
    assert output.results[0].token_id == reference.tokens[4]
    assert_same_logits([logits[1]], [reference.logits[4]])
    assert worker.sequences[1].output_token_ids == reference.tokens[:5]


def test_seeded_forks_are_reproducible_and_distinct(make_worker: WorkerFactory, stories_dir: Path) -> None:
    seeded = SamplingParams(temperature=1.0, seed=42)

    def sample_family() -> dict[int, list[int]]:
        worker = make_worker(stories_dir, 16)
        plan = SeqPlan(1, STORIES_PROMPT, num_decode=15, sampling=seeded, fork_ids=[2, 3])
        runs = run_plans(worker, [plan], BlockAllocator(worker.num_blocks, shuffle_seed=2))
        assert [worker.sequences[i].sampling.seed for i in (1, 2, 3)] == [42, 43, 44]
        return {seq_id: run.tokens for seq_id, run in runs.items()}

    family = sample_family()
    assert sample_family() == family
    assert len({tuple(tokens) for tokens in family.values()}) == 3
