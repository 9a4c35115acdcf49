"""The worker engine: owns the model, the KV page pool and every live sequence's state, and executes
one StepInput at a time (see shared/protocol.py for what a step carries and in which order it applies).

Failures stay local: a malformed new sequence or scheduled entry fails only that sequence, a failed
forward pass or sampling fails the sequences scheduled in that step, a failed KV transfer fails only
that transfer, and the worker keeps serving.

The step's page movements (swaps, copies, the host's KV store, KV transfers to and from other
workers) are worker/page_movements.py's.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable

import torch

from paged.shared.config import GiB, CacheConfig, KVSharingConfig, ModelConfig, default_cpu_threads
from paged.shared.logging import get_logger
from paged.shared.protocol import (
    NewSequence,
    ScheduledSeq,
    SeqError,
    SeqResult,
    StepInput,
    StepOutput,
    TokenLogprob,
    TransferFailure,
)
from paged.shared.sampling_params import SamplingParams
from paged.worker.input_batch import check_scheduled, prepare_inputs
from paged.worker.kv_cache import KVCache, cuda_kv_cache_budget, num_blocks_for_budget
from paged.worker.model_loader import load_model
from paged.worker.page_movements import PageMovements
from paged.worker.sampler import Sampler, SamplerOutput
from paged.worker.sampling_batch import SamplingBatch, check_sampling
from paged.worker.sequence_state import SequenceState

log = get_logger("worker")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Worker:
    """In-process engine: the gateway (or a test) sends StepInputs, gets StepOutputs."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        max_num_batched_tokens: int = 2048,
        sharing: KVSharingConfig | None = None,
    ) -> None:
        """Load the model and allocate the page pool. On CUDA the pool gets what gpu_memory_utilization
        leaves after a profiling forward of `max_num_batched_tokens` tokens (the largest step the
        scheduler will send); on CPU it gets cache_config.kv_cache_memory bytes. `sharing` opens the
        KV transport (if it names an endpoint) and attaches the host's KV store (if it has memory)."""
        device = resolve_device(model_config.device)
        if device.type == "cpu":
            torch.set_num_threads(model_config.cpu_threads or default_cpu_threads(1))
        backend = model_config.attention_backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "cpu"
        loaded = load_model(model_config.model, model_config.dtype, str(device), backend, model_config.seed)
        self.model = loaded.model
        self.arch = loaded.arch
        self.dtype = loaded.dtype
        self.device = loaded.device
        self.block_size = cache_config.block_size
        self.max_model_len = model_config.max_model_len or self.arch.max_model_len
        if self.max_model_len > self.arch.max_model_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's context window of {self.arch.max_model_len}"
            )

        if self.device.type == "cuda":
            log.info("kv_cache_sizing", progress=f"sizing the KV cache: profiling a step of {max_num_batched_tokens} tokens…")
            budget = cuda_kv_cache_budget(
                self.device, cache_config.gpu_memory_utilization, lambda: self._profile_forward(max_num_batched_tokens)
            )
        else:
            budget = cache_config.kv_cache_memory
        num_blocks = num_blocks_for_budget(budget, self.arch, self.block_size, self.dtype)
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds {num_blocks} blocks of {self.block_size} tokens, "
                f"fewer than one sequence of max_model_len={self.max_model_len}: raise the budget or lower max_model_len"
            )
        num_host_blocks = num_blocks_for_budget(cache_config.swap_space, self.arch, self.block_size, self.dtype)
        log.info(
            "kv_cache_allocating", progress=f"allocating the KV cache: {budget / GiB:.2f} GiB on {self.device}…",
            budget_bytes=budget, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
        )  # fmt: skip
        self.kv_cache = KVCache(self.arch, num_blocks, self.block_size, self.dtype, self.device, num_host_blocks)
        self.sampler = Sampler()
        self.sequences: dict[int, SequenceState] = {}
        self.pages = PageMovements(self.kv_cache, sharing or KVSharingConfig(), self.dtype)
        log.info(
            "kv_cache_allocated",
            progress=f"KV cache ready: {num_blocks} blocks of {self.block_size} tokens (+{num_host_blocks} host blocks for swapping)",
            num_blocks=num_blocks,
            num_host_blocks=num_host_blocks,
            block_size=self.block_size,
            kv_tokens=num_blocks * self.block_size,
            dtype=str(self.dtype),
            device=str(self.device),
        )

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.kv_cache.num_host_blocks

    @property
    def page_bytes(self) -> int:
        return self.kv_cache.page_nbytes

    @property
    def transfer_endpoint(self) -> str:
        return self.pages.transfer_endpoint

    @property
    def kv_store_id(self) -> str:
        return self.pages.kv_store_id

    @property
    def num_store_slots(self) -> int:
        return self.pages.num_store_slots

    @property
    def block_context_cost(self) -> float:
        return self.arch.block_context_cost(self.block_size)

    def close(self) -> None:
        self.pages.close()

    def execute_step(self, step: StepInput) -> StepOutput:
        return self._execute(step, keep_logits=False)[0]

    def execute_step_with_logits(self, step: StepInput) -> tuple[StepOutput, dict[int, torch.Tensor]]:
        """execute_step, plus the float32 logits row each sampled sequence (forked children included) drew from."""
        return self._execute(step, keep_logits=True)

    def _execute(self, step: StepInput, keep_logits: bool) -> tuple[StepOutput, dict[int, torch.Tensor]]:
        started = time.perf_counter()
        errors: dict[int, str] = {}
        pages = self.pages
        pages.cancel(step)
        for seq_id in step.freed_seq_ids:
            self.sequences.pop(seq_id, None)
        try:
            store_s = pages.move(step)
        except Exception as exc:
            # Which sequences own the pages is the gateway's knowledge: fail everything this step runs.
            log.error("block_transfer_failed", step_id=step.step_id, error=repr(exc), traceback=traceback.format_exc())
            errors = {seq.seq_id: f"block copy/swap failed: {exc}" for seq in step.scheduled}
            output = self._output(step, [], errors, 0.0, started, pages.not_started(step, exc))
            output.page_moves_failed = True
            return output, {}
        pages.receive(step)

        for new in step.new_seqs:
            try:
                self._add_sequence(new)
            except ValueError as exc:
                errors[new.seq_id] = str(exc)
        runnable = self._apply_scheduled(step.scheduled, errors)

        results: list[SeqResult] = []
        logits_by_seq: dict[int, torch.Tensor] = {}
        forward_s = 0.0
        if runnable:
            forward_started = time.perf_counter()
            try:
                results, logits_by_seq = self._run(runnable, keep_logits)
            except Exception as exc:
                # A formatted string, not exc_info: a rich traceback would render the tensors in every frame.
                log.error(
                    "forward_failed",
                    step_id=step.step_id,
                    num_seqs=len(runnable),
                    error=repr(exc),
                    traceback=traceback.format_exc(),
                )
                errors.update((seq.seq_id, f"forward pass failed: {exc}") for seq in runnable)
            forward_s = time.perf_counter() - forward_started
        for seq_id, message in errors.items():
            log.warning("sequence_failed", step_id=step.step_id, seq_id=seq_id, error=message)
        failed = pages.send(step, errors)
        output = self._output(step, results, errors, forward_s, started, failed)
        output.store_save_s, output.store_load_s = store_s
        return output, logits_by_seq

    def _add_sequence(self, new: NewSequence) -> None:
        if not new.token_ids:
            raise ValueError("a new sequence needs at least one token")
        if len(new.token_ids) > self.max_model_len:
            raise ValueError(f"{len(new.token_ids)} tokens exceed max_model_len={self.max_model_len}")
        if not 0 <= new.num_output_tokens <= len(new.token_ids):
            raise ValueError(f"num_output_tokens={new.num_output_tokens} outside 0..{len(new.token_ids)}")
        vocab_size = self.arch.vocab_size
        if any(not 0 <= token < vocab_size for token in new.token_ids):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        check_sampling(new.sampling, vocab_size)
        # Its block table arrives with its first ScheduledSeq (table_from 0).
        state = SequenceState.from_tokens(new.token_ids, new.num_output_tokens, [], new.sampling)
        self.sequences[new.seq_id] = state

    def _apply_scheduled(self, scheduled: Iterable[ScheduledSeq], errors: dict[int, str]) -> list[ScheduledSeq]:
        """Apply each entry's block-table delta and keep the entries that can run; record the others in `errors`."""
        runnable: list[ScheduledSeq] = []
        seen: set[int] = set()
        for seq in scheduled:
            if seq.seq_id in errors:  # its NewSequence was rejected; already reported
                continue
            try:
                state = self.sequences.get(seq.seq_id)
                if state is None:
                    raise ValueError("unknown sequence")
                if seq.seq_id in seen:
                    runnable = [other for other in runnable if other.seq_id != seq.seq_id]  # neither entry runs
                    raise ValueError("scheduled twice in one step")
                if any(child in self.sequences or child in seen for child in seq.fork_ids):
                    raise ValueError(f"fork ids {seq.fork_ids} collide with live sequences")
                self._check_block_ids(seq.new_blocks)
                state.update_block_table(seq.table_from, seq.new_blocks)
                check_scheduled(seq, state, self.block_size, self.max_model_len)
            except ValueError as exc:
                errors[seq.seq_id] = str(exc)
                continue
            seen.add(seq.seq_id)
            seen.update(seq.fork_ids)
            runnable.append(seq)
        return runnable

    def _check_block_ids(self, block_ids: list[int]) -> None:
        if any(not 0 <= block < self.num_blocks for block in block_ids):
            raise ValueError(f"block ids {block_ids} outside the pool of {self.num_blocks} blocks")

    def _run(self, runnable: list[ScheduledSeq], keep_logits: bool) -> tuple[list[SeqResult], dict[int, torch.Tensor]]:
        """Forward over every scheduled token, then sample one token per sampling sequence and per fork.

        Sequence state changes (forks, appended tokens) are made only once everything has succeeded, so a
        failed step leaves the worker's state as the gateway last saw it.
        """
        inputs = prepare_inputs(runnable, self.sequences, self.block_size, self.device)
        children = {
            child_id: self.sequences[seq.seq_id].fork(child_number)
            for seq in runnable
            for child_number, child_id in enumerate(seq.fork_ids, start=1)
        }
        fork_ids = {seq.seq_id: seq.fork_ids for seq in runnable}
        row_seq_ids: list[int] = []  # who samples: each sampling sequence, followed by its forks
        logits_rows: list[int] = []  # and which row of the computed logits it samples from
        for row, seq_id in enumerate(inputs.sample_seq_ids):
            for sampling_id in (seq_id, *fork_ids[seq_id]):
                row_seq_ids.append(sampling_id)
                logits_rows.append(row)

        results: list[SeqResult] = []
        logits_by_seq: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.kv_caches, inputs.meta)
            if row_seq_ids:
                logits = self.model.compute_logits(hidden[inputs.sample_rows])
                if len(logits_rows) != logits.shape[0]:
                    logits = logits.index_select(0, torch.tensor(logits_rows, device=logits.device))
                states = [children.get(seq_id) or self.sequences[seq_id] for seq_id in row_seq_ids]
                batch = SamplingBatch.build(
                    [state.sampling for state in states],
                    [state.prompt_token_ids for state in states],
                    [state.output_token_ids for state in states],
                    self.arch.vocab_size,
                    self.device,
                    [state.history for state in states],
                )
                sampled = self.sampler(logits, batch)
                results = self._results(row_seq_ids, states, sampled)
                if keep_logits:
                    logits_by_seq = dict(zip(row_seq_ids, logits))

        self.sequences.update(children)
        for result in results:
            self.sequences[result.seq_id].append_token(result.token_id)
        return results, logits_by_seq

    @staticmethod
    def _results(seq_ids: list[int], states: list[SequenceState], sampled: SamplerOutput) -> list[SeqResult]:
        token_ids = sampled.token_ids.tolist()
        if sampled.logprobs is None:
            return [SeqResult(seq_id, token) for seq_id, token in zip(seq_ids, token_ids)]
        logprobs = sampled.logprobs.tolist()
        top_ids = sampled.top_token_ids.tolist()  # type: ignore[union-attr]
        top_logprobs = sampled.top_logprobs.tolist()  # type: ignore[union-attr]
        results = []
        for row, (seq_id, state, token) in enumerate(zip(seq_ids, states, token_ids)):
            wanted = state.sampling.logprobs
            if wanted is None:
                results.append(SeqResult(seq_id, token))
                continue
            top = [TokenLogprob(t, lp) for t, lp in zip(top_ids[row][:wanted], top_logprobs[row][:wanted])]
            results.append(SeqResult(seq_id, token, logprobs[row], top))
        return results

    def _output(
        self,
        step: StepInput,
        results: list[SeqResult],
        errors: dict[int, str],
        forward_s: float,
        started: float,
        failed_transfers: list[TransferFailure],
    ) -> StepOutput:
        """The step's output, with every transfer that ended since the previous one."""
        done, failed = self.pages.take_finished()
        return StepOutput(
            step_id=step.step_id,
            results=results,
            errors=[SeqError(seq_id, message) for seq_id, message in errors.items()],
            forward_s=forward_s,
            total_s=time.perf_counter() - started,
            transfers_done=done,
            transfers_failed=failed_transfers + failed,
        )

    def _profile_forward(self, num_tokens: int) -> None:
        """A forward pass over `num_tokens` dummy tokens in sequences of up to max_model_len, with a
        scratch page pool just large enough, then logits for each sequence's last token."""
        lengths = [min(self.max_model_len, num_tokens - done) for done in range(0, num_tokens, self.max_model_len)]
        blocks_per_seq = [-(-length // self.block_size) for length in lengths]
        scratch = KVCache(self.arch, sum(blocks_per_seq), self.block_size, self.dtype, self.device)
        states: dict[int, SequenceState] = {}
        scheduled: list[ScheduledSeq] = []
        first_block = 0
        for seq_id, (length, num_seq_blocks) in enumerate(zip(lengths, blocks_per_seq)):
            table = list(range(first_block, first_block + num_seq_blocks))
            first_block += num_seq_blocks
            states[seq_id] = SequenceState([0] * length, [], table, SamplingParams())
            scheduled.append(ScheduledSeq(seq_id, 0, length))
        inputs = prepare_inputs(scheduled, states, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, scratch.kv_caches, inputs.meta)
            self.model.compute_logits(hidden[inputs.sample_rows])
