"""A step that cannot be encoded fails only the sequences at fault, never the link.

msgpack carries integers in -2^63..2^64-1, and only the types msgspec knows. One value beyond (a
seed, a stop token id, a prompt token) makes the whole StepInput unencodable. The HTTP API refuses
such values, but whatever reaches the scheduler another way (the offline engine, an endpoint to
come, a bug in one request's data) must not take the worker's link, and every stream on it, down:
the step loop lets `fail_unencodable` drop the items of the sequences at fault from the step, fail
their requests as a worker's SeqError would, and sends the rest of the step.

A step scheduled and then stripped this way is consistent: the scheduler's view of the failed
sequences ends at once (their blocks free, the worker told to drop them next step, which it does
for ids it never saw too) and results for them are never looked up.
"""

from __future__ import annotations

from paged.gateway.outputs import RequestOutput
from paged.gateway.scheduler import Scheduler
from paged.shared.logging import get_logger
from paged.shared.protocol import SEQUENCE_ITEMS, StepInput, UnencodableMessage, explain_unencodable

log = get_logger("gateway.unencodable_items")


def split_off_unencodable(step: StepInput) -> dict[int, str]:
    """Remove from `step` every item of each sequence that has an item which cannot be encoded.
    Returns those sequences' ids with where and why."""
    reasons: dict[int, str] = {}
    for name in SEQUENCE_ITEMS:
        for item in getattr(step, name):
            if item.seq_id not in reasons and (reason := explain_unencodable(item)) is not None:
                reasons[item.seq_id] = reason
    if reasons:
        for name in SEQUENCE_ITEMS:
            setattr(step, name, [item for item in getattr(step, name) if item.seq_id not in reasons])
    return reasons


def fail_unencodable(scheduler: Scheduler, step: StepInput, error: UnencodableMessage, worker: str) -> list[RequestOutput]:
    """Strip the sequences at fault from `step` (which `error` failed to encode) and fail their
    requests: the outputs for their streams. Re-raises `error` when no sequence is at fault (the
    gateway's own data: a bug its step loop's supervisor handles)."""
    reasons = split_off_unencodable(step)
    if not reasons:
        raise error
    outputs = scheduler.fail_sequences(
        {seq_id: f"the request cannot be sent to the worker: {reason}" for seq_id, reason in reasons.items()}
    )
    for output in outputs:
        log.warning("request_unencodable", request_id=output.request_id, worker=worker, step_id=step.step_id, error=output.error)
    return outputs
