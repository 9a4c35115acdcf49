"""Prefill/decode disaggregation, the gateway's side: hands a request's KV from a prefill worker to a
decode worker and moves the request along with it (docs/disaggregation.md).

The coordinator owns the transfer table and plays its part in every scheduler's step
(Scheduler.handoff):
- plan: a prefill worker's step samples a request's first token (its prompt's last chunk): pick a
  decode worker (most of the prompt's blocks already cached there, then least loaded, among those
  with seats and free blocks above the watermark), hold the table there (prefix hits first, which
  are not sent, then blocks for the rest), and order the pair of step items: a KVReceive in the
  decode worker's next step, a KVSend in this very step (it starts after the forward pass, so it
  carries the pages the step computes). The request stops being scheduled on the prefill worker.
- after_update: a worker's output brings transfer outcomes, and the prefill worker's output of the
  step above brings the first token. Once both the first token and a done are in, the prefill
  worker lets go of the request (its blocks stay cached there) and the decode worker adopts it:
  the held table becomes its block table and it decodes on from the first token. A receive the
  decode worker gave up before the first token came (its wait for the sender outlasted
  --kv-transfer-timeout while the prefill worker's steps queued: a loaded host) is ordered once
  more with the first token, when the send has started and its Offer waits on the decode worker.
- failure (an end reports failed, the decode worker is lost): cancel on both ends, release the
  decode worker's blocks, and the request goes on decoding on the prefill worker, which still
  holds its blocks and state (it is not handed off again). A lost prefill worker's requests move
  with its others (the engine re-routes them); only the decode side is cleaned up here.
- request_ended (the first token finished it, an abort, an error): cancel on both ends, release.

Blocks are freed on the prefill side only after the decode side has them, or once the transfer is
cancelled in a step that precedes any reuse (kv_cancels run first in a step, and steps to one
worker run in order). Every live transfer holds its blocks on both sides; `audit()` checks it.

No event loop here: the coordinator sees workers as `HandoffNode`s (gateway/replica.py's Replica
in the server; plain objects in tests) and wakes their step loops through them.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from paged.gateway.admission import reserve_blocks
from paged.gateway.block_accounting import AccountingReport
from paged.gateway.block_hash import extend_block_hashes
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.request import Request, SequenceStatus
from paged.gateway.scheduler import Scheduler
from paged.gateway.stats import TransferStats
from paged.gateway.step_builder import StepBuilder
from paged.shared.config import WorkerRole
from paged.shared.logging import get_logger
from paged.shared.protocol import KVReceive, KVSend, StepInput, StepOutput

log = get_logger("gateway.handoff")

PREFILL_CAPABLE: frozenset[WorkerRole] = frozenset({"prefill", "mixed"})
DECODE_CAPABLE: frozenset[WorkerRole] = frozenset({"decode", "mixed"})


class HandoffNode(Protocol):
    """A worker as the coordinator sees it."""

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> WorkerRole: ...

    @property
    def transfer_endpoint(self) -> str:
        """Where other workers send it KV ("": it takes none)."""
        ...

    @property
    def page_bytes(self) -> int:
        """Bytes of one KV page (every layer's K and V of one block); 0 if it did not say."""
        ...

    @property
    def scheduler(self) -> Scheduler | None: ...

    @property
    def ready(self) -> bool: ...

    def wake(self) -> None:
        """Its scheduler has news for its step loop."""
        ...


@dataclass(eq=False, slots=True)
class Transfer:
    transfer_id: int
    request: Request
    source: HandoffNode
    source_scheduler: Scheduler
    dest: HandoffNode
    dest_scheduler: Scheduler
    dest_kv: KVCacheManager
    step_id: int  # the source's step that carries the KVSend: its output brings the first token
    receive: KVReceive
    seats: int  # held on both sides until the transfer ends
    num_skipped: int
    first_token_at: float | None = None  # monotonic time the first token (and so the send) was seen
    done: bool = False
    receive_dropped: bool = False  # the decode worker gave the receive up before the first token
    receive_reordered: bool = False  # ...and was given it again (once)

    @property
    def num_blocks(self) -> int:
        """Blocks sent (the decode side's prefix hits are not)."""
        return len(self.receive.blocks)


class HandoffCoordinator:
    def __init__(self, nodes: Callable[[], Sequence[HandoffNode]], moved: Callable[[Request, HandoffNode], None]) -> None:
        self.nodes = nodes  # every worker, registered or not
        self.moved = moved  # a request now runs on another worker (the engine retargets its stream)
        self.stats = TransferStats()
        self._transfers: dict[int, Transfer] = {}
        self._by_request: dict[Request, Transfer] = {}
        # Unique for this gateway's life and unlikely to meet an id a worker kept from another gateway.
        self._ids = itertools.count(secrets.randbits(62))

    def _node_of(self, scheduler: Scheduler) -> HandoffNode | None:
        return next((node for node in self.nodes() if node.scheduler is scheduler), None)

    @property
    def num_in_flight(self) -> int:
        return len(self._transfers)

    # --- the scheduler's hooks --------------------------------------------------------------------

    def plan(self, scheduler: Scheduler, step: StepBuilder) -> None:
        node = self._node_of(scheduler)
        if node is None or node.role != "prefill" or not isinstance(scheduler.kv, KVCacheManager):
            return
        for request in scheduler.handoff_moves.first_token_requests(step):
            if self._wants_handoff(request):
                self._hand_off(node, scheduler, request, step.step_id)

    def after_update(self, scheduler: Scheduler, step: StepInput, output: StepOutput) -> None:
        if not self._transfers:
            return
        for transfer_id in output.transfers_done:
            transfer = self._transfers.get(transfer_id)
            if transfer is not None:
                transfer.done = True
        for failure in output.transfers_failed:
            transfer = self._transfers.get(failure.transfer_id)
            if transfer is None or transfer.done:
                continue
            if scheduler is transfer.dest_scheduler and transfer.first_token_at is None and not transfer.receive_reordered:
                transfer.receive_dropped = True  # the send has not started: order the receive again with it
            else:
                self._give_up(transfer, "failed", failure.reason)
        for transfer in list(self._transfers.values()):
            if transfer.source_scheduler is scheduler and transfer.step_id == step.step_id:
                transfer.first_token_at = time.monotonic()
                if transfer.receive_dropped:
                    transfer.receive_reordered = True
                    self._order_receive(transfer)
            if transfer.done and transfer.first_token_at is not None:
                self._complete(transfer)

    def request_ended(self, scheduler: Scheduler, request: Request) -> None:
        transfer = self._by_request.get(request)
        if transfer is None or transfer.source_scheduler is not scheduler:
            return
        self._end(transfer)
        self.stats.cancelled += 1
        log.info("kv_transfer_cancelled", transfer_id=transfer.transfer_id, request_id=request.request_id,
                 finish_reason=next((seq.finish_reason for seq in request.seqs if seq.finish_reason), None))  # fmt: skip

    # --- the engine's calls -----------------------------------------------------------------------

    def worker_lost(self, scheduler: Scheduler) -> None:
        """A worker's session ended (its scheduler is about to be emptied): end its transfers. A lost
        prefill worker's requests are re-routed by the engine with its others; requests whose decode
        worker was lost go on where they are."""
        for transfer in list(self._transfers.values()):
            if transfer.source_scheduler is scheduler:
                self._end(transfer, source_alive=False)
                self._record_failure(transfer, "prefill_lost", f"prefill worker {transfer.source.name} was lost")
            elif transfer.dest_scheduler is scheduler:
                self._give_up(transfer, "decode_lost", f"decode worker {transfer.dest.name} was lost", dest_alive=False)

    def snapshot(self) -> TransferStats:
        """A copy of the counters, with the transfers in flight now."""
        snapshot = msgspec.structs.replace(self.stats, in_flight=len(self._transfers))
        snapshot.failures = dict(snapshot.failures)
        snapshot.latency = snapshot.latency.copy()
        return snapshot

    def audit(self) -> AccountingReport:
        """Every live transfer's blocks are held on both sides and its request waits in transfer."""
        report = AccountingReport()
        for transfer in self._transfers.values():
            name = f"transfer {transfer.transfer_id}"
            hold = transfer.dest_kv.incoming.get(transfer.transfer_id)
            if hold is None:
                report.problems.append(f"{name}: no blocks held on decode worker {transfer.dest.name}")
            source_tables = transfer.source_scheduler.kv.seqs
            for seq in transfer.request.live_seqs():
                if seq.status is not SequenceStatus.TRANSFERRING:
                    report.problems.append(f"{name}: seq {seq.seq_id} is {seq.status.value}, not transferring")
                if seq.seq_id not in source_tables:
                    report.problems.append(f"{name}: seq {seq.seq_id} holds no blocks on prefill worker {transfer.source.name}")
        return report

    # --- internals --------------------------------------------------------------------------------

    @staticmethod
    def _wants_handoff(request: Request) -> bool:
        """Worth a transfer: more than the first token to generate, and not handed off before."""
        first = request.seqs[0]
        return not request.kv_transfer_failed and not request.awaiting_shared_prompt and first.max_num_tokens > request.num_prompt_tokens + 1

    def _hand_off(self, source: HandoffNode, scheduler: Scheduler, request: Request, step_id: int) -> None:
        seq = request.live_seqs()[0]
        kv = scheduler.kv
        assert isinstance(kv, KVCacheManager)
        table = kv.block_table(seq.seq_id)
        num_full = request.num_prompt_tokens // kv.block_size
        hashes = seq.block_hashes
        if len(hashes) < num_full:
            extend_block_hashes(hashes, seq.token_ids, num_full * kv.block_size, kv.block_size, request.cache_salt)
        seats = len(request.live_seqs())
        transfer_id = next(self._ids)
        for dest, dest_scheduler, dest_kv in self._decode_candidates(source, request, hashes[:num_full], seats):
            reserve = reserve_blocks(dest_scheduler.planner.watermark_blocks, dest_scheduler.num_running)
            hold = dest_kv.hold_for_transfer(transfer_id, hashes[:num_full], len(table), reserve)
            if hold is not None:
                break
        else:
            return  # no decode worker can take it now: it decodes here (a role is a preference, not a limit)
        scheduler.handoff_moves.start_transfer(request)
        scheduler.groups.transfer_seats += seats
        dest_scheduler.groups.transfer_seats += seats
        scheduler.transfers.send(KVSend(transfer_id, seq.seq_id, dest.transfer_endpoint, table[hold.num_hits :]))
        receive = KVReceive(transfer_id, hold.receive_blocks)
        transfer = Transfer(transfer_id, request, source, scheduler, dest, dest_scheduler, dest_kv, step_id, receive, seats, hold.num_hits)
        self._transfers[transfer_id] = transfer
        self._by_request[request] = transfer
        self.stats.started += 1
        self._order_receive(transfer)
        log.debug("kv_transfer_started", transfer_id=transfer_id, request_id=request.request_id, source=source.name,
                  dest=dest.name, blocks=transfer.num_blocks, skipped=transfer.num_skipped)  # fmt: skip

    @staticmethod
    def _order_receive(transfer: Transfer) -> None:
        transfer.dest_scheduler.transfers.receive(transfer.receive)
        transfer.dest.wake()

    def _decode_candidates(
        self, source: HandoffNode, request: Request, hashes: list[int], seats: int
    ) -> list[tuple[HandoffNode, Scheduler, KVCacheManager]]:
        """Decode-capable workers with seats for the request and room for it in their pool, best
        first: the most prompt blocks cached there (not sent), then the least loaded."""
        ranked = []
        for node in self.nodes():
            scheduler = node.scheduler
            if node is source or scheduler is None or not node.ready or node.role not in DECODE_CAPABLE or not node.transfer_endpoint:
                continue
            kv = scheduler.kv
            if not isinstance(kv, KVCacheManager):
                continue
            if scheduler.groups.seats_taken() + seats > scheduler.config.max_num_seqs:
                continue
            if kv.peak_blocks(request.num_prompt_tokens, request.seqs[0].max_num_tokens, request.params.n) > kv.num_blocks:
                continue
            hits = kv.num_cached(hashes)
            load = scheduler.num_running + scheduler.num_waiting + scheduler.groups.transfer_seats
            ranked.append((hits, -load, node, scheduler, kv))
        ranked.sort(key=lambda entry: entry[:2], reverse=True)
        return [(node, scheduler, kv) for _, _, node, scheduler, kv in ranked]

    def _complete(self, transfer: Transfer) -> None:
        """Done and the first token in: the decode worker takes the request over."""
        request = transfer.request
        self._forget(transfer)
        transfer.source_scheduler.handoff_moves.release_transferred(request)
        transfer.source_scheduler.groups.transfer_seats -= transfer.seats
        transfer.dest_kv.adopt_transfer(transfer.transfer_id, request.live_seqs(), request.num_prompt_tokens)
        transfer.dest_scheduler.groups.transfer_seats -= transfer.seats
        transfer.dest_scheduler.handoff_moves.adopt_transferred(request)
        transfer.source.wake()
        transfer.dest.wake()
        self.moved(request, transfer.dest)
        elapsed = time.monotonic() - transfer.first_token_at  # type: ignore[operator]  # set before any completion
        stats = self.stats
        stats.completed += 1
        stats.blocks += transfer.num_blocks
        stats.bytes += transfer.num_blocks * transfer.source.page_bytes
        stats.blocks_skipped += transfer.num_skipped
        stats.latency.observe(elapsed)
        log.debug("kv_transfer_done", transfer_id=transfer.transfer_id, request_id=request.request_id, seconds=round(elapsed, 4))

    def _give_up(self, transfer: Transfer, kind: str, reason: str, dest_alive: bool = True) -> None:
        """The transfer failed: the request goes on decoding on the prefill worker."""
        self._end(transfer, dest_alive=dest_alive)
        request = transfer.request
        request.kv_transfer_failed = True
        transfer.source_scheduler.handoff_moves.resume_transferring(request)
        self._record_failure(transfer, kind, reason)

    def _end(self, transfer: Transfer, source_alive: bool = True, dest_alive: bool = True) -> None:
        """Cancel on the ends still there and give the decode side's blocks and both sides' seats back."""
        transfer_id = transfer.transfer_id
        if source_alive:
            transfer.source_scheduler.transfers.cancel(transfer_id)
            transfer.source_scheduler.groups.transfer_seats -= transfer.seats
            transfer.source.wake()
        if dest_alive:
            transfer.dest_scheduler.transfers.cancel(transfer_id)
            transfer.dest_kv.incoming.release(transfer_id)
            transfer.dest_scheduler.groups.transfer_seats -= transfer.seats
            transfer.dest.wake()
        self._forget(transfer)

    def _forget(self, transfer: Transfer) -> None:
        del self._transfers[transfer.transfer_id]
        del self._by_request[transfer.request]
        transfer.source_scheduler.transfers.settle(transfer.transfer_id)
        transfer.dest_scheduler.transfers.settle(transfer.transfer_id)

    def _record_failure(self, transfer: Transfer, kind: str, reason: str) -> None:
        failures = self.stats.failures
        failures[kind] = failures.get(kind, 0) + 1
        log.warning("kv_transfer_failed", transfer_id=transfer.transfer_id, request_id=transfer.request.request_id,
                    source=transfer.source.name, dest=transfer.dest.name, reason=reason)  # fmt: skip
