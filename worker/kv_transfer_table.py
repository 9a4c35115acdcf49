"""The transfers of one ZmqTransport (worker/zmq_transport.py), both directions, and what each
message of the link protocol (worker/kv_link.py) does to them; the sockets stay in the transport.

One lock covers every change to the table and each page read or write (landed pages are written
into the pool here, pages to send are read here), so when cancel() returns no page of that transfer
is touched again and the gateway may reuse its blocks in the same step. Every public method takes
the lock itself; the `_locked` ones expect it held.

Failures are per transfer: one that makes no progress for `timeout` seconds fails on that end (a
dead peer, a truncated stream, an Offer no KVReceive ever matches), a layout or size mismatch fails
at once. The messages the table owes a peer (Ready, Done, Fail) wait as notices until the transport's
I/O thread sends them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import zmq

from paged.shared.logging import get_logger
from paged.shared.protocol import TransferFailure
from paged.worker.kv_link import Block, Done, Fail, LinkMessage, Offer, Ready
from paged.worker.kv_transfer import PagePool

log = get_logger("worker.kv_transfer_table")

MAX_REFUSED_IDS = 4096  # transfers this receiver answered "unknown" to, remembered to answer once


@dataclass(slots=True)
class Outgoing:
    transfer_id: int
    peer: str
    blocks: list[int]
    deadline: float
    state: Literal["new", "offered", "streaming", "sent"] = "new"
    next_index: int = 0
    page: torch.Tensor | None = None  # read, not yet taken by the socket


@dataclass(slots=True)
class Incoming:
    transfer_id: int
    blocks: list[int]
    deadline: float
    sender: bytes | None = None  # the sender's ROUTER identity, once its Offer matched
    received: bytearray = field(default_factory=bytearray)
    num_received: int = 0


@dataclass(slots=True)
class PendingOffer:
    sender: bytes
    offer: Offer
    deadline: float


# Messages the I/O thread sends for the table: ("router", identity) replies, ("peer", endpoint) notices.
Notice = tuple[Literal["router", "peer"], bytes | str, LinkMessage]


class TransferTable:
    def __init__(self, pages: PagePool, timeout: float) -> None:
        self.timeout = timeout
        self._pages = pages
        self._layout = pages.page_layout
        self._page_nbytes = pages.page_nbytes
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._outgoing: dict[int, Outgoing] = {}
        self._incoming: dict[int, Incoming] = {}
        self._offers: dict[int, PendingOffer] = {}  # arrived before their KVReceive
        self._notices: list[Notice] = []
        self._done: list[int] = []
        self._failed: list[TransferFailure] = []
        self._refused: set[int] = set()
        self._broken = ""  # why the I/O thread died, if it did: every transfer fails from then on

    # --- The worker's main thread ---------------------------------------------------------------

    def send(self, transfer_id: int, peer: str, blocks: list[int]) -> None:
        with self._lock:
            if self._refuse_locked(transfer_id, blocks, transfer_id in self._outgoing):
                return
            self._outgoing[transfer_id] = Outgoing(transfer_id, peer, list(blocks), time.monotonic() + self.timeout)

    def receive(self, transfer_id: int, blocks: list[int]) -> None:
        with self._lock:
            if self._refuse_locked(transfer_id, blocks, transfer_id in self._incoming):
                return
            incoming = Incoming(transfer_id, list(blocks), time.monotonic() + self.timeout, received=bytearray(len(blocks)))
            self._incoming[transfer_id] = incoming
            pending = self._offers.pop(transfer_id, None)
            if pending is not None:
                self._match_locked(incoming, pending.sender, pending.offer)

    def cancel(self, transfer_id: int) -> None:
        with self._lock:
            outgoing = self._outgoing.pop(transfer_id, None)
            incoming = self._incoming.pop(transfer_id, None)
            self._offers.pop(transfer_id, None)
            self._done = [done for done in self._done if done != transfer_id]
            self._failed = [failure for failure in self._failed if failure.transfer_id != transfer_id]
            if outgoing is not None and outgoing.state != "new":
                self._notices.append(("peer", outgoing.peer, Fail(transfer_id, "cancelled on the sending side")))
            if incoming is not None and incoming.sender is not None:
                self._notices.append(("router", incoming.sender, Fail(transfer_id, "cancelled on the receiving side")))

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = [], []
        return done, failed

    def wait_finished(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done or self._failed or not (self._outgoing or self._incoming), timeout)

    def _refuse_locked(self, transfer_id: int, blocks: list[int], duplicate: bool) -> bool:
        """Fail a transfer the gateway ordered wrongly. True if refused."""
        if self._broken:
            reason = self._broken
        elif duplicate:
            reason = "transfer id already in flight on this worker"
        elif any(not 0 <= block < self._pages.num_blocks for block in blocks):
            reason = f"block ids {blocks} outside the pool of {self._pages.num_blocks} blocks"
        else:
            return False
        self._failed.append(TransferFailure(transfer_id, reason))
        self._changed.notify_all()
        return True

    # --- The I/O thread: sending ----------------------------------------------------------------

    def take_due(self) -> tuple[list[Notice], list[Outgoing]]:
        """The notices to send now, and the outgoing transfers with an Offer or pages to send."""
        with self._lock:
            notices, self._notices = self._notices, []
            return notices, [t for t in self._outgoing.values() if t.state in ("new", "streaming")]

    def offer(self, transfer: Outgoing) -> Offer:
        return Offer(transfer.transfer_id, len(transfer.blocks), self._layout)

    def offered(self, transfer: Outgoing) -> None:
        with self._lock:
            transfer.state = "offered"
            transfer.deadline = time.monotonic() + self.timeout

    def next_page(self, transfer: Outgoing) -> torch.Tensor | None:
        """The page to send next (read once, kept until the socket takes it); None once the transfer
        was cancelled or failed: nothing more of it is read."""
        with self._lock:
            if self._outgoing.get(transfer.transfer_id) is not transfer:
                return None
            if transfer.page is None:
                transfer.page = self._pages.read_page(transfer.blocks[transfer.next_index])
            return transfer.page

    def page_sent(self, transfer: Outgoing) -> bool:
        """The socket took the page next_page() gave. True if pages are left."""
        with self._lock:
            transfer.page = None
            transfer.next_index += 1
            transfer.deadline = time.monotonic() + self.timeout
            if transfer.next_index == len(transfer.blocks):
                transfer.state = "sent"
                return False
            return True

    def fail(self, transfer: Outgoing, reason: str) -> None:
        with self._lock:
            self._fail_outgoing_locked(transfer, reason)

    # --- The I/O thread: messages and time ------------------------------------------------------

    def on_receiver_message(self, sender: bytes, message: LinkMessage, payload: list[zmq.Frame]) -> None:
        """A message to this worker's receiving side."""
        with self._lock:
            transfer_id = message.transfer_id
            incoming = self._incoming.get(transfer_id)
            match message:
                case Offer() if incoming is None:
                    self._offers[transfer_id] = PendingOffer(sender, message, time.monotonic() + self.timeout)
                case Offer() if incoming.sender is None:  # type: ignore[union-attr]
                    self._match_locked(incoming, sender, message)  # type: ignore[arg-type]
                case Offer() if incoming.sender != sender:  # type: ignore[union-attr]
                    self._notices.append(("router", sender, Fail(transfer_id, "another sender already offered this transfer")))
                case Block(index=index) if incoming is not None and incoming.sender == sender:
                    self._write_locked(incoming, index, payload)
                case Block() if transfer_id not in self._refused:
                    if len(self._refused) >= MAX_REFUSED_IDS:
                        self._refused.clear()
                    self._refused.add(transfer_id)
                    self._notices.append(("router", sender, Fail(transfer_id, "no such transfer on the receiving side")))
                case Fail(reason=reason) if incoming is not None and incoming.sender == sender:
                    self._fail_locked(transfer_id, f"sender: {reason}")
                case Fail():
                    self._offers.pop(transfer_id, None)

    def on_sender_message(self, message: LinkMessage) -> None:
        """A receiver's answer to this worker's sending side."""
        with self._lock:
            transfer = self._outgoing.get(message.transfer_id)
            if transfer is None:
                return
            match message:
                case Ready() if transfer.state == "offered":
                    transfer.state = "streaming"
                    transfer.deadline = time.monotonic() + self.timeout
                case Done() if transfer.state == "sent":
                    del self._outgoing[transfer.transfer_id]
                    self._done.append(transfer.transfer_id)
                    self._changed.notify_all()
                case Fail(reason=reason):
                    self._fail_locked(transfer.transfer_id, f"receiver: {reason}")
                case _:
                    self._fail_outgoing_locked(transfer, f"receiver sent {type(message).__name__} while the transfer was {transfer.state}")

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((t.deadline for t in (*self._outgoing.values(), *self._incoming.values(), *self._offers.values())), default=None)

    def expire(self, now: float) -> None:
        with self._lock:
            for transfer in [t for t in self._outgoing.values() if t.deadline < now]:
                what = {
                    "new": "could not be offered",
                    "offered": "was not accepted",
                    "streaming": f"stalled after {transfer.next_index} of {len(transfer.blocks)} blocks",
                    "sent": "was not acknowledged",
                }[transfer.state]
                self._fail_outgoing_locked(transfer, f"transfer to {transfer.peer} {what} within {self.timeout}s")
            for incoming in [t for t in self._incoming.values() if t.deadline < now]:
                if incoming.sender is None:
                    reason = f"no sender offered it within {self.timeout}s"
                else:
                    reason = f"stream stalled after {incoming.num_received} of {len(incoming.blocks)} blocks"
                    self._notices.append(("router", incoming.sender, Fail(incoming.transfer_id, reason)))
                self._fail_locked(incoming.transfer_id, reason)
            for transfer_id, pending in [(i, p) for i, p in self._offers.items() if p.deadline < now]:
                del self._offers[transfer_id]
                reason = f"no KVReceive for it within {self.timeout}s"
                self._notices.append(("router", pending.sender, Fail(transfer_id, reason)))

    def break_down(self, reason: str) -> None:
        """The I/O thread died: every transfer in flight fails, and every one ordered from now on."""
        with self._lock:
            self._broken = reason
            for transfer_id in [*self._outgoing, *self._incoming]:
                self._fail_locked(transfer_id, reason)

    # --- With the lock held -----------------------------------------------------------------------

    def _match_locked(self, incoming: Incoming, sender: bytes, offer: Offer) -> None:
        """Pair a KVReceive with its sender's Offer."""
        if offer.layout != self._layout:
            reason = f"pages differ: the sender's are {offer.layout}, the receiver's {self._layout}"
        elif offer.num_blocks != len(incoming.blocks):
            reason = f"the sender offers {offer.num_blocks} blocks, the receiver expects {len(incoming.blocks)}"
        else:
            incoming.sender = sender
            incoming.deadline = time.monotonic() + self.timeout
            self._notices.append(("router", sender, Ready(offer.transfer_id)))
            self._complete_if_received_locked(incoming)
            return
        self._notices.append(("router", sender, Fail(offer.transfer_id, reason)))
        self._fail_locked(incoming.transfer_id, reason)

    def _write_locked(self, incoming: Incoming, index: int, payload: list[zmq.Frame]) -> None:
        """Write one landed page into the pool."""
        if not 0 <= index < len(incoming.blocks) or len(payload) != 1 or len(payload[0].buffer) != self._page_nbytes:
            reason = f"malformed block {index}: expected one page of {self._page_nbytes} bytes"
            self._notices.append(("router", incoming.sender, Fail(incoming.transfer_id, reason)))  # type: ignore[arg-type]
            self._fail_locked(incoming.transfer_id, reason)
            return
        if not incoming.received[index]:
            self._pages.write_page(incoming.blocks[index], torch.frombuffer(payload[0].buffer, dtype=torch.uint8))
            incoming.received[index] = 1
            incoming.num_received += 1
        incoming.deadline = time.monotonic() + self.timeout
        self._complete_if_received_locked(incoming)

    def _complete_if_received_locked(self, incoming: Incoming) -> None:
        if incoming.num_received == len(incoming.blocks):
            del self._incoming[incoming.transfer_id]
            self._notices.append(("router", incoming.sender, Done(incoming.transfer_id)))  # type: ignore[arg-type]
            self._done.append(incoming.transfer_id)
            self._changed.notify_all()

    def _fail_outgoing_locked(self, transfer: Outgoing, reason: str) -> None:
        """Fail an outgoing transfer and tell its receiver, if it may have heard of it."""
        if self._outgoing.get(transfer.transfer_id) is transfer and transfer.state != "new":
            self._notices.append(("peer", transfer.peer, Fail(transfer.transfer_id, reason)))
        self._fail_locked(transfer.transfer_id, reason)

    def _fail_locked(self, transfer_id: int, reason: str) -> None:
        """Record a failure and forget the transfer on this side."""
        if self._outgoing.pop(transfer_id, None) is None and self._incoming.pop(transfer_id, None) is None:
            return
        log.warning("kv_transfer_failed", transfer_id=transfer_id, reason=reason)
        self._failed.append(TransferFailure(transfer_id, reason))
        self._changed.notify_all()
