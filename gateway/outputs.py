"""What the scheduler reports back about requests after each step, consumed by the engine and the HTTP layer."""

from __future__ import annotations

import msgspec

from paged.shared.protocol import TokenLogprob


# msgspec Structs rather than dataclasses: several are built per sequence per step, and Structs are
# cheaper to build; gc=False because they never form reference cycles, so the collector skips them.
class SequenceDelta(msgspec.Struct, gc=False):
    """New tokens of one of a request's n sequences since the last report."""

    index: int  # which of the request's n choices
    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token, when requested
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" (eos, stop token, stop string) or "length"; None while running


class RequestOutput(msgspec.Struct, gc=False):
    request_id: str
    deltas: list[SequenceDelta] = []  # msgspec copies a mutable default per instance
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_s: float | None = None  # time from arrival to first scheduling, on the first output only
    finished: bool = False  # every sequence has finished
    error: str | None = None  # the request failed (worker error, worker lost with nowhere to go)
