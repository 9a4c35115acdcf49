"""Applying a step's results: newly full blocks join the prefix cache, sampled tokens are appended,
the stop rules run, and each request with news gets a RequestOutput.

Blocks join the prefix cache only here, once the step that computed them is done and all their
token ids are known. A result for a sequence that finished meanwhile (an extra step already sent
for it, overlapped scheduling) or that was reset by a recompute preemption is stale and ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.outputs import RequestOutput, SequenceDelta
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.gateway.step_builder import is_stale
from paged.shared.protocol import StepInput, StepOutput


HOLDING_COMPUTED = (SequenceStatus.RUNNING, SequenceStatus.TRANSFERRING)


def stop_reason(seq: Sequence, token: int) -> str | None:
    """Why `seq` ends with `token` just appended: "stop" (eos or a stop token), "length" (max_tokens
    or the context window), or None while it runs on."""
    if token in seq.request.stop_token_ids:
        return "stop"
    if len(seq.token_ids) >= seq.max_num_tokens:
        return "length"
    return None


def register_computed_blocks(step: StepInput, seqs: dict[int, Sequence], allocator: BlockAllocator) -> None:
    """Offer the prefix cache the blocks this step completed; a decode that stays inside its block completes none."""
    size = allocator.block_size
    step_id = step.step_id
    for scheduled in step.scheduled:
        end = scheduled.start + scheduled.num_tokens
        if end // size != scheduled.start // size:
            seq = seqs.get(scheduled.seq_id)
            # A sequence handed off to a decode worker in this step registers its prompt here too.
            if seq is not None and seq.status in HOLDING_COMPUTED and not is_stale(seq, step_id):
                allocator.cache_computed(seq, end)


class OutputProcessor:
    """Turns StepOutputs into RequestOutputs; ending sequences and requests is the scheduler's
    (`finish_seq(seq, reason)` and `fail_request(request, reason)` return the state they ended in)."""

    def __init__(
        self,
        seqs: dict[int, Sequence],
        finish_seq: Callable[[Sequence, str], SequenceStatus],
        fail_request: Callable[[Request, str], None],
    ) -> None:
        self.seqs = seqs
        self.finish_seq = finish_seq
        self.fail_request = fail_request

    def fail(self, request: Request, message: str) -> RequestOutput:
        """End `request` with an error now; the output that tells its stream."""
        request.error = message
        self.fail_request(request, "error")
        return RequestOutput(
            request.request_id,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            finished=True,
            error=message,
        )

    def process(self, step: StepInput, output: StepOutput, allocator: BlockAllocator) -> tuple[list[RequestOutput], bool]:
        """The outputs, one per request with news, and whether a running sequence finished."""
        seqs = self.seqs
        step_id = step.step_id
        outputs: dict[str, RequestOutput] = {}
        for error in output.errors:
            seq = seqs.get(error.seq_id)
            if seq is not None and not is_stale(seq, step_id):
                outputs[seq.request.request_id] = self.fail(seq.request, error.message)
        if allocator.enable_prefix_caching:
            register_computed_blocks(step, seqs, allocator)
        any_running_finished = False
        now = 0.0
        # The hot loop of the gateway (every sampled token of every step): names bound locally and
        # the stale check (step_builder.is_stale) inlined.
        for result in output.results:
            seq = seqs.get(result.seq_id)
            if seq is None or step_id <= seq.ignore_results_until or seq.num_tokens == len(seq.token_ids):
                continue
            request = seq.request
            token = result.token_id
            seq.token_ids.append(token)
            finish_reason = stop_reason(seq, token)
            if not request.wants_logprobs:
                delta = SequenceDelta(seq.index, [token], None, None, finish_reason)
            else:
                logprob = result.logprob if result.logprob is not None else 0.0
                delta = SequenceDelta(seq.index, [token], [logprob], [result.top_logprobs or []], finish_reason)
            request_output = outputs.get(request.request_id)
            if request_output is None:
                request_output = outputs[request.request_id] = RequestOutput(
                    request.request_id, [delta], len(request.prompt_token_ids), request.num_cached_tokens
                )
                if request.first_token_time is None:
                    request.first_token_time = now = now or time.monotonic()
            else:
                request_output.deltas.append(delta)
            if finish_reason is not None:
                was = self.finish_seq(seq, finish_reason)
                any_running_finished |= was is SequenceStatus.RUNNING
                if request.finished:
                    request_output.finished = True
        return list(outputs.values()), any_running_finished
