"""A worker that does no model work: the "null model" for benchmarking the gateway and testing the
process plumbing without a forward pass.

It has the real Worker's interface and answers every sampling sequence (and every n>1 fork) with a
deterministic token that depends only on the sequence id and the position sampled, so runs are
reproducible and a request moved to another worker continues the same stream. `step_s` stands in
for a forward pass (sleeping), to study overlap and failures with steps that take time.

It holds no KV, so KV movement is bookkeeping only, for exercising the gateway's disaggregation and
KV store orchestration without a model: every KVSend and KVReceive is reported done in the step that
orders it (failed, on a worker without a transfer endpoint), and store saves and loads are accepted
against a pretend store of `kv_offload_memory` bytes (null workers given the same store name report
the same store id, as if they shared it).
"""

from __future__ import annotations

import time

from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig
from paged.shared.protocol import SeqError, SeqResult, StepInput, StepOutput, TransferFailure
from paged.shared.tokenizer import BUILTIN_VOCAB_SIZE

NULL_VOCAB_SIZE = BUILTIN_VOCAB_SIZE  # every token decodes with the built-in byte-level tokenizer
NULL_MAX_MODEL_LEN = 4096
NULL_BYTES_PER_TOKEN = 4096  # pretend KV footprint per token slot, sizes the pool from kv_cache_memory
FIRST_NULL_TOKEN = 3  # stays clear of the usual unk/bos/eos ids 0..2, so eos never ends a null run early


def null_token(seq_id: int, position: int) -> int:
    """The token a null worker samples for `seq_id` after `position` tokens."""
    return FIRST_NULL_TOKEN + (seq_id * 7919 + position) % (NULL_VOCAB_SIZE - FIRST_NULL_TOKEN)


class NullWorker:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        max_num_batched_tokens: int,
        step_s: float = 0.0,
        sharing: KVSharingConfig | None = None,
    ) -> None:
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.kv_cache_memory // (NULL_BYTES_PER_TOKEN * self.block_size)
        self.num_host_blocks = cache_config.swap_space // (NULL_BYTES_PER_TOKEN * self.block_size)
        self.page_bytes = NULL_BYTES_PER_TOKEN * self.block_size
        self.max_model_len = model_config.max_model_len or NULL_MAX_MODEL_LEN
        self.device = "cpu"
        self.dtype = "float32"
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_s = step_s
        sharing = sharing or KVSharingConfig()
        self.transfer_endpoint = sharing.kv_transfer_endpoint or ""
        self.num_store_slots = sharing.kv_offload_memory // self.page_bytes
        self.block_context_cost = 0.0  # no model: recomputing costs nothing more for depth
        self.kv_store_id = f"null:{sharing.kv_store_name}" if self.num_store_slots else ""

    def execute_step(self, step: StepInput) -> StepOutput:
        started = time.perf_counter()
        # Like the real worker, a sequence with token ids outside the vocabulary fails alone.
        bad = {new.seq_id for new in step.new_seqs if any(not 0 <= t < NULL_VOCAB_SIZE for t in new.token_ids)}
        results: list[SeqResult] = []
        for seq in step.scheduled:
            if not seq.sample or seq.seq_id in bad:
                continue
            position = seq.start + seq.num_tokens
            results.append(SeqResult(seq.seq_id, null_token(seq.seq_id, position)))
            results.extend(SeqResult(child, null_token(child, position)) for child in seq.fork_ids)
        if self.step_s and step.scheduled:
            time.sleep(self.step_s)
        errors = [SeqError(seq_id, f"token ids must lie in [0, {NULL_VOCAB_SIZE})") for seq_id in sorted(bad)]
        transfer_ids = [item.transfer_id for item in (*step.kv_receives, *step.kv_sends)]
        done, failed = [], []
        if self.transfer_endpoint:
            done = transfer_ids
        else:
            failed = [TransferFailure(transfer_id, "this worker has no KV transfer endpoint") for transfer_id in transfer_ids]
        return StepOutput(
            step_id=step.step_id,
            results=results,
            errors=errors,
            forward_s=time.perf_counter() - started,
            transfers_done=done,
            transfers_failed=failed,
        )

    def close(self) -> None:
        pass
