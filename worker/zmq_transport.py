"""KVTransport over ZeroMQ (the link protocol is in worker/kv_link.py).

Pages are written into the receiver's pool as they land, so a transfer is complete the moment its last
block arrives; the sender reports done only on the receiver's Done, that is once the receiver holds
every page.

Threads: one I/O thread per transport owns the sockets and does every page read and write; the worker's
main thread registers work and cancels it. The transfers and what each link message does to them are
in worker/kv_transfer_table.py, under one lock that also covers each page read or write, so when
cancel() returns no page of that transfer is touched again and the gateway may reuse its blocks in the
same step. Sends never block the I/O thread (a full queue waits for POLLOUT), so two workers sending
to each other cannot deadlock.

Failures are per transfer (the table says when one fails), and other transfers on the same link carry on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import msgspec
import zmq

from paged.shared.config import MiB
from paged.shared.logging import get_logger
from paged.shared.protocol import TransferFailure
from paged.worker.kv_link import Block, LinkMessage
from paged.worker.kv_transfer import PagePool
from paged.worker.kv_transfer_table import Outgoing, TransferTable

log = get_logger("worker.zmq_transport")

BURST_BLOCKS = 32  # pages one transfer sends before the I/O thread looks at its other sockets again
QUEUE_BYTES = 64 * MiB  # per socket and direction, what may wait in ZeroMQ's queues
MAX_POLL_S = 1.0


class ZmqTransport:
    """KVTransport over ZeroMQ. Binds `endpoint` at once; `endpoint` then names it as peers reach it."""

    def __init__(self, pages: PagePool, endpoint: str, timeout: float) -> None:
        self._table = TransferTable(pages, timeout)
        page_nbytes = pages.page_nbytes
        self._queue_messages = max(8, QUEUE_BYTES // max(1, page_nbytes))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(LinkMessage)
        self._context = zmq.Context()
        self._router = self._socket(zmq.ROUTER)
        self._router.bind(endpoint)
        self.endpoint = advertised_endpoint(self._router.getsockopt_string(zmq.LAST_ENDPOINT))

        # The I/O thread's own state.
        self._peers: dict[str, zmq.Socket] = {}
        self._blocked: set[zmq.Socket] = set()  # sockets whose queue was full: wait for POLLOUT
        self._poller = zmq.Poller()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kv-transfer", daemon=True)
        self._thread.start()
        log.info("kv_transfer_listening", endpoint=self.endpoint, page_bytes=page_nbytes)

    # --- The worker's main thread ---------------------------------------------------------------

    def send(self, transfer_id: int, peer: str, blocks: list[int]) -> None:
        self._table.send(transfer_id, peer, blocks)
        self._wake()

    def receive(self, transfer_id: int, blocks: list[int]) -> None:
        self._table.receive(transfer_id, blocks)
        self._wake()

    def cancel(self, transfer_id: int) -> None:
        self._table.cancel(transfer_id)
        self._wake()

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        return self._table.take_finished()

    def wait_finished(self, timeout: float) -> None:
        self._table.wait_finished(timeout)

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_write, b"\0")
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

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
                self._table.expire(time.monotonic())
        except Exception as exc:
            log.exception("kv_transfer_thread_failed")
            self._table.break_down(f"the KV transfer thread failed: {exc!r}")
        finally:
            for sock in (self._router, *self._peers.values()):
                sock.close()
            self._context.term()

    def _idle_ms(self) -> float:
        now = time.monotonic()
        deadline = self._table.next_deadline()
        wait = (now + MAX_POLL_S if deadline is None else deadline) - now
        return max(0.0, min(wait, MAX_POLL_S)) * 1000

    def _pump(self) -> bool:
        """Send what is due: notices, offers, pages. True if pages are left that a socket could take now."""
        notices, active = self._table.take_due()
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
                self._table.fail(transfer, f"cannot connect to {transfer.peer}: {exc}")
                continue
            if sock in self._blocked:
                continue
            if transfer.state == "new":
                if self._send(sock, [self._encoder.encode(self._table.offer(transfer))]):
                    self._table.offered(transfer)
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

    def _stream(self, sock: zmq.Socket, transfer: Outgoing) -> bool:
        """Send up to BURST_BLOCKS pages. True if pages are left and the socket may take more."""
        for _ in range(BURST_BLOCKS):
            page = self._table.next_page(transfer)
            if page is None:
                return False  # cancelled or failed meanwhile: read nothing more
            header = self._encoder.encode(Block(transfer.transfer_id, transfer.next_index))
            if not self._send(sock, [header, page.numpy()]):
                return False
            if not self._table.page_sent(transfer):
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
            if from_router:
                self._table.on_receiver_message(sender.bytes, message, frames[1:])
            else:
                self._table.on_sender_message(message)


def advertised_endpoint(bound: str) -> str:
    """How peers reach a bound endpoint: a wildcard tcp address becomes this host's name."""
    parts = urlsplit(bound)
    if parts.scheme == "tcp" and parts.hostname in ("0.0.0.0", "::", "*"):
        return f"tcp://{socket.gethostname()}:{parts.port}"
    return bound

