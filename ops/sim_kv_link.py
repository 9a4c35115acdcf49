"""The KV transfer link between simulated workers (ops/sim_worker.py), for testing the gateway's
prefill/decode hand-off without processes or sockets.

A transfer moves once both ends have executed their item: the KVReceive (registered before the
receiving worker's forward pass) and the KVSend (started after the sending worker's forward pass).
Then every page is copied, slot by slot, from the sender's blocks into the receiver's, so the
receiver's verification reads exactly what the sender computed (a wrong block mapping shows as a
wrong token), and each end reports the transfer done in its next output, as real workers do. A
cancel withdraws that end's item; nothing is reported for it afterwards. Tests can make transfers
fail (`fail_next`), stall (`hold`), or time out the receives still waiting for their sender
(`expire_receives`, as a receiving worker does after --kv-transfer-timeout) to drive the failure paths.
"""

from __future__ import annotations

from typing import Protocol

from paged.shared.protocol import KVReceive, KVSend, TransferFailure


class PageHolder(Protocol):
    """A simulated worker's device pages: one token id (or None) per slot of each block."""

    device: list[list[int | None]]


class SimulatedKVLink:
    def __init__(self) -> None:
        self.hold = False  # stall: pairs wait until release_held()
        self.fail_next = 0  # the next this many matched transfers fail instead of moving
        self.num_moved = 0
        self._receives: dict[int, tuple[PageHolder, list[int]]] = {}
        self._sends: dict[int, tuple[PageHolder, list[int]]] = {}
        self._done: dict[int, list[int]] = {}  # id(worker) -> transfer ids to report
        self._failed: dict[int, list[TransferFailure]] = {}

    def receive(self, worker: PageHolder, item: KVReceive) -> None:
        self._receives[item.transfer_id] = (worker, item.blocks)
        self._match(item.transfer_id)

    def send(self, worker: PageHolder, item: KVSend) -> None:
        self._sends[item.transfer_id] = (worker, item.blocks)
        self._match(item.transfer_id)

    def cancel(self, worker: PageHolder, transfer_id: int) -> None:
        for pending in (self._receives, self._sends):
            if transfer_id in pending and pending[transfer_id][0] is worker:
                del pending[transfer_id]
        self._done[id(worker)] = [t for t in self._done.get(id(worker), []) if t != transfer_id]
        self._failed[id(worker)] = [f for f in self._failed.get(id(worker), []) if f.transfer_id != transfer_id]

    def expire_receives(self) -> None:
        """Every receive still waiting (no send yet, or the pair held) fails on its worker, as if no
        Offer had come in time; its send, if any, waits for a new receive of its id."""
        for transfer_id in list(self._receives):
            receiver, _ = self._receives.pop(transfer_id)
            self._failed.setdefault(id(receiver), []).append(TransferFailure(transfer_id, "no sender offered it"))

    def drop_worker(self, worker: PageHolder) -> None:
        """The worker died: its items and reports go with it."""
        for pending in (self._receives, self._sends):
            for transfer_id in [t for t, (holder, _) in pending.items() if holder is worker]:
                del pending[transfer_id]
        self._done.pop(id(worker), None)
        self._failed.pop(id(worker), None)

    def take_finished(self, worker: PageHolder) -> tuple[list[int], list[TransferFailure]]:
        return self._done.pop(id(worker), []), self._failed.pop(id(worker), [])

    def release_held(self) -> None:
        self.hold = False
        for transfer_id in list(self._sends):
            self._match(transfer_id)

    @property
    def num_pending(self) -> int:
        return len(self._receives) + len(self._sends)

    def _match(self, transfer_id: int) -> None:
        if self.hold or transfer_id not in self._receives or transfer_id not in self._sends:
            return
        receiver, dst = self._receives.pop(transfer_id)
        sender, src = self._sends.pop(transfer_id)
        if self.fail_next or len(src) != len(dst):
            self.fail_next = max(0, self.fail_next - 1)
            reason = "injected failure" if len(src) == len(dst) else f"{len(src)} pages sent for {len(dst)} blocks"
            for worker in (receiver, sender):
                self._failed.setdefault(id(worker), []).append(TransferFailure(transfer_id, reason))
            return
        if receiver.device and sender.device:  # verifying workers: the pages themselves
            for src_block, dst_block in zip(src, dst, strict=True):
                receiver.device[dst_block] = list(sender.device[src_block])
        self.num_moved += 1
        for worker in (receiver, sender):
            self._done.setdefault(id(worker), []).append(transfer_id)
