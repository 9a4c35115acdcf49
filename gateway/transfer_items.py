"""One worker's side of the KV transfers the gateway orders (prefill/decode disaggregation,
docs/disaggregation.md): the transfer items its next step carries, and the transfers it is an end of.

A transfer is a pair of step items under one id, never a side channel: a KVReceive on the worker
taking the blocks, a KVSend on the one holding them (gateway/handoff.py decides both). They wait
here until the worker's scheduler builds its next step (`fill`). The gateway then waits for the
outcome, which either end reports with a later StepOutput; an end that has nothing else to do is
sent polling steps (`transfer_wait_s`: the worker answers as soon as a transfer ends, or after
that long), so an idle worker's report is not left waiting for unrelated work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paged.shared.protocol import KVReceive, KVSend, StepInput

# How long an idle worker waits for a transfer to end before answering a polling step. New work for
# that worker waits at most this long behind the poll; shorter only spins more round trips.
TRANSFER_POLL_S = 0.02


@dataclass(slots=True)
class TransferItems:
    sends: list[KVSend] = field(default_factory=list)
    receives: list[KVReceive] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    open: set[int] = field(default_factory=set)  # transfers whose outcome the gateway awaits from this worker

    def send(self, item: KVSend) -> None:
        self.sends.append(item)
        self.open.add(item.transfer_id)

    def receive(self, item: KVReceive) -> None:
        self.receives.append(item)
        self.open.add(item.transfer_id)

    def cancel(self, transfer_id: int) -> None:
        """Drop a transfer on this worker: an item not sent yet is simply withdrawn (a cancel in the
        same step would run before it, leaving it registered), one sent is cancelled by the next
        step, and one this worker never got needs nothing."""
        if transfer_id not in self.open:
            return
        self.open.discard(transfer_id)
        unsent = len(self.sends) + len(self.receives)
        self.sends = [item for item in self.sends if item.transfer_id != transfer_id]
        self.receives = [item for item in self.receives if item.transfer_id != transfer_id]
        if len(self.sends) + len(self.receives) == unsent:
            self.cancels.append(transfer_id)

    def settle(self, transfer_id: int) -> None:
        """The gateway knows this transfer's outcome: no need to poll for it any more."""
        self.open.discard(transfer_id)

    @property
    def has_news(self) -> bool:
        """Items to send, or a transfer to poll for."""
        return bool(self.sends or self.receives or self.cancels or self.open)

    def fill(self, step: StepInput) -> None:
        """Put the pending items into the step being built; a step with nothing scheduled polls
        while a transfer is open."""
        if self.sends:
            step.kv_sends, self.sends = self.sends, []
        if self.receives:
            step.kv_receives, self.receives = self.receives, []
        if self.cancels:
            step.kv_cancels, self.cancels = self.cancels, []
        if self.open and not step.scheduled:
            step.transfer_wait_s = TRANSFER_POLL_S
