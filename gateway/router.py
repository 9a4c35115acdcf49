"""Which replica a request runs on: among the ready replicas that take prompts (role prefill or
mixed; any ready replica when none of those is), the one whose prefix cache already holds the
longest part of its prompt, otherwise the least loaded one. Where a prefill replica hands the
request on to decode is gateway/handoff.py's choice, made when its first token is sampled."""

from __future__ import annotations

from collections.abc import Sequence

from paged.gateway.admission import AdmissionError, Refusal
from paged.gateway.handoff import PREFILL_CAPABLE
from paged.gateway.replica import Replica
from paged.gateway.request import Request
from paged.shared.logging import get_logger

log = get_logger("gateway.router")


def route(replicas: Sequence[Replica], request: Request, exclude: Replica | None = None) -> Replica:
    """The replica for `request` (never `exclude`); AdmissionError(unavailable) when none is ready.
    A decode replica takes prompts only while no prefill-capable one is ready (a role is a
    preference: a decode worker can prefill)."""
    ready = [replica for replica in replicas if replica.ready and replica is not exclude]
    if not ready:
        raise AdmissionError(Refusal.UNAVAILABLE, "no worker is ready")
    ready = [replica for replica in ready if replica.role in PREFILL_CAPABLE] or ready
    if len(ready) == 1:
        return ready[0]
    matches = {
        replica: replica.scheduler.prefix_match_tokens(request.prompt_token_ids, request.cache_salt)  # type: ignore[union-attr]
        for replica in ready
    }
    best = max(ready, key=lambda replica: (matches[replica], -replica.load))
    log.debug("request_routed", request_id=request.request_id, worker=best.name, prefix_match_tokens=matches[best])
    return best
