"""One scheduler's part in the KV hand-offs between prefill and decode workers (docs/disaggregation.md),
which gateway/handoff.py coordinates: the hooks the scheduler calls it through at every step
(`HandoffHooks`), and the moves of the scheduler's requests it orders (`HandoffMoves`): a request
leaves the running batch while its KV is sent, leaves the scheduler once the decode worker holds it,
or goes on here if the hand-off is given up; the decode worker's scheduler adopts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from paged.gateway.block_allocator import BlockAllocator
from paged.gateway.policy_queues import PolicyQueues
from paged.gateway.request import Request, Sequence, SequenceStatus
from paged.gateway.step_builder import StepBuilder, WorkerMirror
from paged.shared.protocol import StepInput, StepOutput

if TYPE_CHECKING:
    from paged.gateway.scheduler import Scheduler


class HandoffHooks(Protocol):
    """What moves requests from prefill to decode workers (gateway/handoff.py) hears of a scheduler."""

    def plan(self, scheduler: Scheduler, step: StepBuilder) -> None:
        """A step is being built: hand off the requests whose first token it samples."""
        ...

    def after_update(self, scheduler: Scheduler, step: StepInput, output: StepOutput) -> None:
        """A step's results were applied (its transfer outcomes are in `output`)."""
        ...

    def request_ended(self, scheduler: Scheduler, request: Request) -> None:
        """A request left this scheduler finished (stop, abort, error)."""
        ...


class HandoffMoves:
    """The moves over the parts of a scheduler's worker session (made afresh with them)."""

    def __init__(
        self,
        requests: dict[str, Request],
        seqs: dict[int, Sequence],
        allocator: BlockAllocator,
        queues: PolicyQueues,
        mirror: WorkerMirror,
    ) -> None:
        self.requests = requests  # the scheduler's unfinished requests
        self.seqs = seqs  # and live sequences, by id
        self.allocator = allocator
        self.queues = queues
        self.mirror = mirror

    def first_token_requests(self, step: StepBuilder) -> list[Request]:
        """Requests whose first output token this step samples: it computes their prompt's last chunk
        (not a later step that decodes the first token's placeholder, overlapped)."""
        seqs = self.seqs
        found = []
        for seq_id, scheduled in step.scheduled.items():
            if scheduled.sample:
                seq = seqs[seq_id]
                num_prompt_tokens = seq.request.num_prompt_tokens
                if seq.index == 0 and scheduled.start + scheduled.num_tokens == num_prompt_tokens == len(seq.token_ids):
                    found.append(seq.request)
        return found

    def start_transfer(self, request: Request) -> None:
        """The request's KV leaves for a decode worker: its sequences (children included) keep their
        blocks but leave the running batch, so no step schedules them here any more."""
        for seq in request.live_seqs():
            seq.status = SequenceStatus.TRANSFERRING
        self.queues.drop_finished_running()  # keeps only RUNNING sequences

    def release_transferred(self, request: Request) -> None:
        """The decode worker holds the request's KV: it leaves this scheduler without finishing. Its
        blocks return to the pool (full ones stay cached for later hits), the worker drops it."""
        for seq in request.live_seqs():
            self.allocator.free(seq)
            self.seqs.pop(seq.seq_id, None)
            self.mirror.drop(seq)
        self.requests.pop(request.request_id, None)

    def resume_transferring(self, request: Request) -> None:
        """A hand-off was given up: the request goes on here. Its blocks and the worker's state of it
        were kept all along, so it rejoins the running batch where it left it (a first token still
        in flight is decoded next, as after any sampling step)."""
        for seq in request.live_seqs():
            self.queues.add_running(seq)

    def adopt_transferred(self, request: Request) -> None:
        """A request whose KV came in by transfer (its block tables are in the allocator already,
        KVCacheManager.adopt_transfer) and whose first token is known joins the running batch: its
        sequences decode from the token after the prompt, each a NewSequence to this worker."""
        self.queues.stamp_arrival(request)
        self.requests[request.request_id] = request
        for seq in request.live_seqs():
            seq.on_worker = False
            seq.ignore_results_until = -1  # step ids of the worker it came from mean nothing here
            seq.num_computed = request.num_prompt_tokens
            self.seqs[seq.seq_id] = seq
            self.queues.add_running(seq)
