"""KVTransport over ZeroMQ (the link protocol is in worker/kv_link.py).

Pages are written into the receiver's pool as they land, so a transfer is complete the moment its last
block arrives; the sender reports done only on the receiver's Done, that is once the receiver holds
every page.

Threads: one I/O thread per transport owns the sockets and does every page read and write; the worker's
main thread registers work and cancels it. One lock covers each page read or write and every change to
the transfer tables, so when cancel() returns no page of that transfer is touched again and the gateway
may reuse its blocks in the same step. Sends never block the I/O thread (a full queue waits for
POLLOUT), so two workers sending to each other cannot deadlock.

Failures are per transfer: one that makes no progress for `timeout` seconds fails on that end (a dead
peer, a truncated stream, an Offer no KVReceive ever matches), a layout or size mismatch fails at once,
and other transfers on the same link carry on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import msgspec
import torch
import zmq

from paged.shared.config import MiB
from paged.shared.logging import get_logger
from paged.shared.protocol import TransferFailure
from paged.worker.kv_link import Block, Done, Fail, LinkMessage, Offer, Ready
from paged.worker.kv_transfer import PagePool

log = get_logger("worker.zmq_transport")

BURST_BLOCKS = 32  # pages one transfer sends before the I/O thread looks at its other sockets again
QUEUE_BYTES = 64 * MiB  # per socket and direction, what may wait in ZeroMQ's queues
MAX_POLL_S = 1.0
MAX_REFUSED_IDS = 4096  # transfers this receiver answered "unknown" to, remembered to answer once


@dataclass(slots=True)
class _Outgoing:
    transfer_id: int
    peer: str
    blocks: list[int]
    deadline: float
    state: Literal["new", "offered", "streaming", "sent"] = "new"
    next_index: int = 0
    page: torch.Tensor | None = None  # read, not yet taken by the socket


@dataclass(slots=True)
class _Incoming:
    transfer_id: int
    blocks: list[int]
    deadline: float
    sender: bytes | None = None  # the sender's ROUTER identity, once its Offer matched
    received: bytearray = field(default_factory=bytearray)
    num_received: int = 0


@dataclass(slots=True)
class _PendingOffer:
    sender: bytes
    offer: Offer
    deadline: float


# Messages the I/O thread sends for others: ("router", identity) replies, ("peer", endpoint) notices.
_Notice = tuple[Literal["router", "peer"], bytes | str, LinkMessage]


class ZmqTransport:
    """KVTransport over ZeroMQ. Binds `endpoint` at once; `endpoint` then names it as peers reach it."""

    def __init__(self, pages: PagePool, endpoint: str, timeout: float) -> None:
        self._pages = pages
        self._timeout = timeout
        self._layout = pages.page_layout
        self._page_nbytes = pages.page_nbytes
        self._queue_messages = max(8, QUEUE_BYTES // max(1, self._page_nbytes))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(LinkMessage)
        self._context = zmq.Context()
        self._router = self._socket(zmq.ROUTER)
        self._router.bind(endpoint)
        self.endpoint = advertised_endpoint(self._router.getsockopt_string(zmq.LAST_ENDPOINT))

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._outgoing: dict[int, _Outgoing] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._offers: dict[int, _PendingOffer] = {}  # arrived before their KVReceive
        self._notices: list[_Notice] = []
        self._done: list[int] = []
        self._failed: list[TransferFailure] = []
        self._refused: set[int] = set()
        self._broken = ""  # why the I/O thread died, if it did: every transfer fails from then on

        # The I/O thread's own state.
        self._peers: dict[str, zmq.Socket] = {}
        self._blocked: set[zmq.Socket] = set()  # sockets whose queue was full: wait for POLLOUT
        self._poller = zmq.Poller()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kv-transfer", daemon=True)
        self._thread.start()
        log.info("kv_transfer_listening", endpoint=self.endpoint, page_bytes=self._page_nbytes)

    # --- The worker's main thread ---------------------------------------------------------------

    def send(self, transfer_id: int, peer: str, blocks: list[int]) -> None:
        with self._lock:
            if self._refuse(transfer_id, blocks, transfer_id in self._outgoing):
                return
            self._outgoing[transfer_id] = _Outgoing(transfer_id, peer, list(blocks), time.monotonic() + self._timeout)
        self._wake()

    def receive(self, transfer_id: int, blocks: list[int]) -> None:
        with self._lock:
            if self._refuse(transfer_id, blocks, transfer_id in self._incoming):
                return
            incoming = _Incoming(transfer_id, list(blocks), time.monotonic() + self._timeout, received=bytearray(len(blocks)))
            self._incoming[transfer_id] = incoming
            pending = self._offers.pop(transfer_id, None)
            if pending is not None:
                self._match(incoming, pending.sender, pending.offer)
        self._wake()

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
        self._wake()

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = [], []
        return done, failed

    def wait_finished(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done or self._failed or not (self._outgoing or self._incoming), timeout)

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_write, b"\0")
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _refuse(self, transfer_id: int, blocks: list[int], duplicate: bool) -> bool:
        """Fail a transfer the gateway ordered wrongly (with the lock held). True if refused."""
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

    def _wake(self) -> None:
        if self._stopping:  # closed: the pipe may be gone
            return
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    # --- The I/O thread -------------------------------------------------------------------------

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.linger = 0
        return sock

    def _run(self) -> None:
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._stopping:
                busy = self._pump()
                events = dict(self._poller.poll(0 if busy else self._idle_ms()))
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                if events.get(self._router, 0) & zmq.POLLIN:
                    self._drain(self._router)
                for sock in list(self._peers.values()):
                    flags = events.get(sock, 0)
                    if flags & zmq.POLLOUT and sock in self._blocked:
                        self._blocked.discard(sock)
                        self._poller.register(sock, zmq.POLLIN)
                    if flags & zmq.POLLIN:
                        self._drain(sock)
                self._expire(time.monotonic())
        except Exception as exc:
            log.exception("kv_transfer_thread_failed")
            with self._lock:
                self._broken = f"the KV transfer thread failed: {exc!r}"
                for transfer_id in [*self._outgoing, *self._incoming]:
                    self._fail_locked(transfer_id, self._broken)
        finally:
            for sock in (self._router, *self._peers.values()):
                sock.close()
            self._context.term()

    def _idle_ms(self) -> float:
        with self._lock:
            deadlines = [t.deadline for t in (*self._outgoing.values(), *self._incoming.values(), *self._offers.values())]
        wait = min(deadlines, default=time.monotonic() + MAX_POLL_S) - time.monotonic()
        return max(0.0, min(wait, MAX_POLL_S)) * 1000

    def _pump(self) -> bool:
        """Send what is due: notices, offers, pages. True if pages are left that a socket could take now."""
        with self._lock:
            notices, self._notices = self._notices, []
            active = [t for t in self._outgoing.values() if t.state in ("new", "streaming")]
        for kind, target, message in notices:
            sock = self._router if kind == "router" else self._peers.get(target)  # type: ignore[arg-type]
            if sock is not None:
                frames = [target, self._encoder.encode(message)] if kind == "router" else [self._encoder.encode(message)]
                try:  # best effort: a peer that is gone needs no notice
                    sock.send_multipart(frames, zmq.NOBLOCK)  # type: ignore[arg-type]
                except zmq.ZMQError:
                    pass
        more = False
        for transfer in active:
            try:
                sock = self._peer(transfer.peer)
            except zmq.ZMQError as exc:
                self._fail(transfer, f"cannot connect to {transfer.peer}: {exc}")
                continue
            if sock in self._blocked:
                continue
            if transfer.state == "new":
                self._offer(sock, transfer)
            elif self._stream(sock, transfer):
                more = True
        return more

    def _peer(self, endpoint: str) -> zmq.Socket:
        sock = self._peers.get(endpoint)
        if sock is None:
            sock = self._socket(zmq.DEALER)
            sock.sndhwm = sock.rcvhwm = self._queue_messages
            sock.connect(endpoint)
            self._peers[endpoint] = sock
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _offer(self, sock: zmq.Socket, transfer: _Outgoing) -> None:
        offer = Offer(transfer.transfer_id, len(transfer.blocks), self._layout)
        if self._send(sock, [self._encoder.encode(offer)]):
            with self._lock:
                transfer.state = "offered"
                transfer.deadline = time.monotonic() + self._timeout

    def _stream(self, sock: zmq.Socket, transfer: _Outgoing) -> bool:
        """Send up to BURST_BLOCKS pages. True if pages are left and the socket may take more."""
        for _ in range(BURST_BLOCKS):
            with self._lock:
                if self._outgoing.get(transfer.transfer_id) is not transfer:
                    return False  # cancelled or failed meanwhile: read nothing more
                if transfer.page is None:
                    transfer.page = self._pages.read_page(transfer.blocks[transfer.next_index])
            header = self._encoder.encode(Block(transfer.transfer_id, transfer.next_index))
            if not self._send(sock, [header, transfer.page.numpy()]):
                return False
            with self._lock:
                transfer.page = None
                transfer.next_index += 1
                transfer.deadline = time.monotonic() + self._timeout
                if transfer.next_index == len(transfer.blocks):
                    transfer.state = "sent"
                    return False
        return True

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        """Send without blocking; if the socket's queue is full, wait for it to drain (POLLOUT)."""
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._blocked.add(sock)
            self._poller.register(sock, zmq.POLLIN | zmq.POLLOUT)
            return False
        return True

    def _drain(self, sock: zmq.Socket) -> None:
        from_router = sock is self._router
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if from_router:
                sender, *frames = frames
            try:
                message = self._decoder.decode(frames[0].buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("kv_transfer_message_dropped", error=str(exc))
                continue
            with self._lock:
                if from_router:
                    self._on_receiver_message(sender.bytes, message, frames[1:])
                else:
                    self._on_sender_message(message)

    def _on_receiver_message(self, sender: bytes, message: LinkMessage, payload: list[zmq.Frame]) -> None:
        """A message to this worker's receiving side (lock held)."""
        transfer_id = message.transfer_id
        incoming = self._incoming.get(transfer_id)
        match message:
            case Offer() if incoming is None:
                self._offers[transfer_id] = _PendingOffer(sender, message, time.monotonic() + self._timeout)
            case Offer() if incoming.sender is None:  # type: ignore[union-attr]
                self._match(incoming, sender, message)  # type: ignore[arg-type]
            case Offer() if incoming.sender != sender:  # type: ignore[union-attr]
                self._notices.append(("router", sender, Fail(transfer_id, "another sender already offered this transfer")))
            case Block(index=index) if incoming is not None and incoming.sender == sender:
                self._write(incoming, index, payload)
            case Block() if transfer_id not in self._refused:
                if len(self._refused) >= MAX_REFUSED_IDS:
                    self._refused.clear()
                self._refused.add(transfer_id)
                self._notices.append(("router", sender, Fail(transfer_id, "no such transfer on the receiving side")))
            case Fail(reason=reason) if incoming is not None and incoming.sender == sender:
                self._fail_locked(transfer_id, f"sender: {reason}")
            case Fail():
                self._offers.pop(transfer_id, None)

    def _on_sender_message(self, message: LinkMessage) -> None:
        """A receiver's answer to this worker's sending side (lock held)."""
        transfer = self._outgoing.get(message.transfer_id)
        if transfer is None:
            return
        match message:
            case Ready() if transfer.state == "offered":
                transfer.state = "streaming"
                transfer.deadline = time.monotonic() + self._timeout
            case Done() if transfer.state == "sent":
                del self._outgoing[transfer.transfer_id]
                self._done.append(transfer.transfer_id)
                self._changed.notify_all()
            case Fail(reason=reason):
                self._fail_locked(transfer.transfer_id, f"receiver: {reason}")
            case _:
                self._fail(transfer, f"receiver sent {type(message).__name__} while the transfer was {transfer.state}", locked=True)

    def _match(self, incoming: _Incoming, sender: bytes, offer: Offer) -> None:
        """Pair a KVReceive with its sender's Offer (lock held)."""
        if offer.layout != self._layout:
            reason = f"pages differ: the sender's are {offer.layout}, the receiver's {self._layout}"
        elif offer.num_blocks != len(incoming.blocks):
            reason = f"the sender offers {offer.num_blocks} blocks, the receiver expects {len(incoming.blocks)}"
        else:
            incoming.sender = sender
            incoming.deadline = time.monotonic() + self._timeout
            self._notices.append(("router", sender, Ready(offer.transfer_id)))
            self._complete_if_received(incoming)
            return
        self._notices.append(("router", sender, Fail(offer.transfer_id, reason)))
        self._fail_locked(incoming.transfer_id, reason)

    def _write(self, incoming: _Incoming, index: int, payload: list[zmq.Frame]) -> None:
        """Write one landed page into the pool (lock held)."""
        if not 0 <= index < len(incoming.blocks) or len(payload) != 1 or len(payload[0].buffer) != self._page_nbytes:
            reason = f"malformed block {index}: expected one page of {self._page_nbytes} bytes"
            self._notices.append(("router", incoming.sender, Fail(incoming.transfer_id, reason)))  # type: ignore[arg-type]
            self._fail_locked(incoming.transfer_id, reason)
            return
        if not incoming.received[index]:
            self._pages.write_page(incoming.blocks[index], torch.frombuffer(payload[0].buffer, dtype=torch.uint8))
            incoming.received[index] = 1
            incoming.num_received += 1
        incoming.deadline = time.monotonic() + self._timeout
        self._complete_if_received(incoming)

    def _complete_if_received(self, incoming: _Incoming) -> None:
        if incoming.num_received == len(incoming.blocks):
            del self._incoming[incoming.transfer_id]
            self._notices.append(("router", incoming.sender, Done(incoming.transfer_id)))  # type: ignore[arg-type]
            self._done.append(incoming.transfer_id)
            self._changed.notify_all()

    def _expire(self, now: float) -> None:
        with self._lock:
            for transfer in [t for t in self._outgoing.values() if t.deadline < now]:
                what = {
                    "new": "could not be offered",
                    "offered": "was not accepted",
                    "streaming": f"stalled after {transfer.next_index} of {len(transfer.blocks)} blocks",
                    "sent": "was not acknowledged",
                }[transfer.state]
                self._fail(transfer, f"transfer to {transfer.peer} {what} within {self._timeout}s", locked=True)
            for incoming in [t for t in self._incoming.values() if t.deadline < now]:
                if incoming.sender is None:
                    reason = f"no sender offered it within {self._timeout}s"
                else:
                    reason = f"stream stalled after {incoming.num_received} of {len(incoming.blocks)} blocks"
                    self._notices.append(("router", incoming.sender, Fail(incoming.transfer_id, reason)))
                self._fail_locked(incoming.transfer_id, reason)
            for transfer_id, pending in [(i, p) for i, p in self._offers.items() if p.deadline < now]:
                del self._offers[transfer_id]
                reason = f"no KVReceive for it within {self._timeout}s"
                self._notices.append(("router", pending.sender, Fail(transfer_id, reason)))

    def _fail(self, transfer: _Outgoing, reason: str, locked: bool = False) -> None:
        """Fail an outgoing transfer and tell its receiver, if it may have heard of it."""
        if not locked:
            with self._lock:
                self._fail(transfer, reason, locked=True)
            return
        if self._outgoing.get(transfer.transfer_id) is transfer and transfer.state != "new":
            self._notices.append(("peer", transfer.peer, Fail(transfer.transfer_id, reason)))
        self._fail_locked(transfer.transfer_id, reason)

    def _fail_locked(self, transfer_id: int, reason: str) -> None:
        """Record a failure and forget the transfer on this side (lock held)."""
        if self._outgoing.pop(transfer_id, None) is None and self._incoming.pop(transfer_id, None) is None:
            return
        log.warning("kv_transfer_failed", transfer_id=transfer_id, reason=reason)
        self._failed.append(TransferFailure(transfer_id, reason))
        self._changed.notify_all()


def advertised_endpoint(bound: str) -> str:
    """How peers reach a bound endpoint: a wildcard tcp address becomes this host's name."""
    parts = urlsplit(bound)
    if parts.scheme == "tcp" and parts.hostname in ("0.0.0.0", "::", "*"):
        return f"tcp://{socket.gethostname()}:{parts.port}"
    return bound

