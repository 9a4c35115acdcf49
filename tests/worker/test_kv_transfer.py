"""Worker-to-worker KV page transfers over a real ZeroMQ transport (ipc, tcp): pages land bit for bit in
the blocks the receiver names, whichever end the gateway reaches first; failures (a dead peer, a
truncated stream, a mismatch, a cancel) end that transfer only, and nothing is written after a cancel."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from paged.shared.protocol import TransferFailure
from paged.worker import kv_link, zmq_transport
from paged.worker.builtin_model import BUILTIN_ARCH
from paged.worker.kv_cache import KVCache
from paged.worker.kv_link import Block, Fail, Offer, Ready
from paged.worker.kv_transfer import NoTransport
from paged.worker.server import default_transfer_endpoint
from paged.worker.zmq_transport import ZmqTransport, advertised_endpoint

ARCH = dataclasses.replace(BUILTIN_ARCH, num_layers=3, num_kv_heads=2, head_dim=4)
NUM_BLOCKS, BLOCK_SIZE = 64, 4
TIMEOUT_S = 0.5  # stall timeout of the transports under test
WAIT_S = 10.0  # how long a test waits for an outcome that must come


def random_cache(seed: int, block_size: int = BLOCK_SIZE) -> KVCache:
    cache = KVCache(ARCH, NUM_BLOCKS, block_size, torch.float32, torch.device("cpu"))
    cache.device_pool.copy_(torch.randn(cache.device_pool.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def pages(cache: KVCache, blocks: list[int]) -> torch.Tensor:
    return cache.device_pool[:, :, blocks].clone()


@pytest.fixture
def transports(ipc_dir: Path) -> Iterator[list[ZmqTransport]]:
    """Transports made by `make`, closed after the test."""
    made: list[ZmqTransport] = []
    yield made
    for transport in made:
        transport.close()


def make(transports: list[ZmqTransport], ipc_dir: Path | None, name: str, cache: KVCache) -> ZmqTransport:
    """A transport on ipc in `ipc_dir`, or (ipc_dir None) on tcp on the loopback, any free port."""
    endpoint = f"ipc://{ipc_dir / name}" if ipc_dir is not None else "tcp://127.0.0.1:*"
    transport = ZmqTransport(cache, endpoint, TIMEOUT_S)
    transports.append(transport)
    return transport


def outcome(transport: ZmqTransport, transfer_ids: set[int]) -> tuple[set[int], dict[int, str]]:
    """Wait until every transfer in `transfer_ids` has ended on this transport: (done, failed reasons)."""
    done: set[int] = set()
    failed: dict[int, str] = {}
    deadline = time.monotonic() + WAIT_S
    while not transfer_ids <= done | set(failed):
        assert time.monotonic() < deadline, f"transfers {transfer_ids - done - set(failed)} never ended"
        transport.wait_finished(0.1)
        finished, failures = transport.take_finished()
        done.update(finished)
        failed.update((f.transfer_id, f.reason) for f in failures)
    return done, failed


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
@pytest.mark.parametrize("receiver_first", [True, False], ids=["receive-then-send", "send-then-receive"])
def test_pages_land_in_the_named_blocks(transports: list[ZmqTransport], ipc_dir: Path, receiver_first: bool, scheme: str) -> None:
    a, b = random_cache(0), random_cache(1)
    directory = ipc_dir if scheme == "ipc" else None
    sender, receiver = make(transports, directory, "a", a), make(transports, directory, "b", b)
    assert receiver.endpoint.startswith(f"{scheme}://") and not receiver.endpoint.endswith("*")
    src, dst = [5, 1, 40, 2], [9, 63, 0, 17]  # unordered, non-contiguous
    untouched = [block for block in range(NUM_BLOCKS) if block not in dst]
    before = pages(b, untouched)
    if receiver_first:
        receiver.receive(7, dst)
        sender.send(7, receiver.endpoint, src)
    else:
        sender.send(7, receiver.endpoint, src)
        time.sleep(0.05)  # the Offer arrives before the gateway's KVReceive: it must wait for it
        receiver.receive(7, dst)
    assert outcome(receiver, {7}) == ({7}, {})
    assert outcome(sender, {7}) == ({7}, {})
    assert torch.equal(pages(b, dst), pages(a, src))
    assert torch.equal(pages(b, untouched), before)


def test_both_directions_at_once_through_full_queues(
    transports: list[ZmqTransport], ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queues of 8 messages: senders block on full sockets and must keep receiving meanwhile."""
    monkeypatch.setattr(zmq_transport, "QUEUE_BYTES", 1)
    a, b = random_cache(0), random_cache(1)
    a_src, b_src = pages(a, list(range(32))), pages(b, list(range(32, 64)))
    ta, tb = make(transports, ipc_dir, "a", a), make(transports, ipc_dir, "b", b)
    blocks_ab = [(i * 7) % 32 for i in range(32)]  # a's blocks 0..31, sent in a scrambled order
    blocks_ba = [32 + (i * 5) % 32 for i in range(32)]
    ta.receive(2, list(range(32, 64)))
    tb.receive(1, list(range(32)))
    ta.send(1, tb.endpoint, blocks_ab)
    tb.send(2, ta.endpoint, blocks_ba)
    assert outcome(ta, {1, 2}) == ({1, 2}, {})
    assert outcome(tb, {1, 2}) == ({1, 2}, {})
    assert torch.equal(b.device_pool[:, :, :32], a_src[:, :, blocks_ab])
    assert torch.equal(a.device_pool[:, :, 32:], b_src[:, :, [block - 32 for block in blocks_ba]])


class FakePeer:
    """A raw socket speaking the link protocol, driven by the test: a receiver (ROUTER) or a sender
    (DEALER) that stops, lies or dies where a real one would not."""

    def __init__(self, kind: int, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(kind)
        self.sock.linger = 0
        self.sock.rcvtimeo = int(WAIT_S * 1000)
        if kind == zmq.ROUTER:
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        self.peer = b""
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(kv_link.LinkMessage)

    def receive(self) -> tuple[kv_link.LinkMessage, list[bytes]]:
        frames = self.sock.recv_multipart()
        if self.sock.type == zmq.ROUTER:
            self.peer, *frames = frames
        return self.decoder.decode(frames[0]), frames[1:]

    def send(self, message: kv_link.LinkMessage, *payload: bytes) -> None:
        prefix = [self.peer] if self.sock.type == zmq.ROUTER else []
        self.sock.send_multipart([*prefix, self.encoder.encode(message), *payload])

    def close(self) -> None:
        self.sock.close()
        self.context.term()


def test_receiver_dying_mid_stream_fails_that_transfer_only(transports: list[ZmqTransport], ipc_dir: Path) -> None:
    a, c = random_cache(0), random_cache(2)
    sender, healthy = make(transports, ipc_dir, "a", a), make(transports, ipc_dir, "c", c)
    doomed = FakePeer(zmq.ROUTER, f"ipc://{ipc_dir / 'b'}")
    healthy.receive(2, list(range(10)))
    sender.send(1, f"ipc://{ipc_dir / 'b'}", list(range(20)))
    sender.send(2, healthy.endpoint, list(range(20, 30)))
    offer, _ = doomed.receive()
    assert offer == Offer(1, 20, a.page_layout)
    doomed.send(Ready(1))
    for _ in range(3):
        header, payload = doomed.receive()
        assert isinstance(header, Block) and len(payload[0]) == a.page_nbytes
    doomed.close()  # dies with 3 of 20 pages in
    done, failed = outcome(sender, {1, 2})
    assert done == {2} and set(failed) == {1}
    assert "transfer to ipc://" in failed[1]
    assert torch.equal(pages(c, list(range(10))), pages(a, list(range(20, 30))))


def test_truncated_stream_fails_on_the_receiver_and_others_complete(transports: list[ZmqTransport], ipc_dir: Path) -> None:
    a, b = random_cache(0), random_cache(1)
    healthy, receiver = make(transports, ipc_dir, "a", a), make(transports, ipc_dir, "b", b)
    truncating = FakePeer(zmq.DEALER, receiver.endpoint)
    receiver.receive(1, [10, 11, 12, 13, 14])
    receiver.receive(2, [20, 21])
    healthy.send(2, receiver.endpoint, [3, 4])
    truncating.send(Offer(1, 5, b.page_layout))
    assert truncating.receive()[0] == Ready(1)
    page = bytes(b.page_nbytes)
    truncating.send(Block(1, 0), page)
    truncating.send(Block(1, 1), page)  # ... and nothing more
    done, failed = outcome(receiver, {1, 2})
    assert done == {2}
    assert failed == {1: "stream stalled after 2 of 5 blocks"}
    assert truncating.receive()[0] == Fail(1, "stream stalled after 2 of 5 blocks")  # the sender is told
    assert torch.equal(pages(b, [20, 21]), pages(a, [3, 4]))
    truncating.close()


def test_nothing_is_written_after_a_cancel(transports: list[ZmqTransport], ipc_dir: Path) -> None:
    b = random_cache(1)
    receiver = make(transports, ipc_dir, "b", b)
    sender = FakePeer(zmq.DEALER, receiver.endpoint)
    receiver.receive(1, [5, 6, 7])
    sender.send(Offer(1, 3, b.page_layout))
    assert sender.receive()[0] == Ready(1)
    ones = torch.ones(b.page_nbytes, dtype=torch.uint8).numpy().tobytes()
    sender.send(Block(1, 0), ones)
    deadline = time.monotonic() + WAIT_S
    while torch.equal(pages(b, [5]), random_cache(1).device_pool[:, :, [5]]):  # until block 0 landed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = pages(b, [6, 7])
    receiver.cancel(1)
    assert sender.receive()[0] == Fail(1, "cancelled on the receiving side")
    sender.send(Block(1, 1), ones)
    sender.send(Block(1, 2), ones)
    assert sender.receive()[0] == Fail(1, "no such transfer on the receiving side")  # read and dropped
    assert torch.equal(pages(b, [6, 7]), before)
    time.sleep(TIMEOUT_S * 2)
    assert receiver.take_finished() == ([], [])  # a cancelled transfer is never reported
    sender.close()


def test_mismatches_fail_at_once(transports: list[ZmqTransport], ipc_dir: Path) -> None:
    a, b, c = random_cache(0), random_cache(1), random_cache(2, block_size=2 * BLOCK_SIZE)
    ta, tb, tc = (make(transports, ipc_dir, name, cache) for name, cache in (("a", a), ("b", b), ("c", c)))
    tb.receive(1, [1, 2, 3])
    ta.send(1, tb.endpoint, [1, 2])  # two blocks offered, three expected
    tc.receive(2, [1])
    ta.send(2, tc.endpoint, [1])  # pages of 4 tokens into a pool of 8-token pages
    ta.send(3, tb.endpoint, [NUM_BLOCKS])  # no such block
    tb.receive(4, [1])
    tb.receive(4, [2])  # the same id twice
    _, a_failed = outcome(ta, {1, 2, 3})
    _, b_failed = outcome(tb, {1, 4})
    _, c_failed = outcome(tc, {2})
    assert "the sender offers 2 blocks, the receiver expects 3" in a_failed[1] == f"receiver: {b_failed[1]}"
    assert "pages differ" in c_failed[2] and a_failed[2] == f"receiver: {c_failed[2]}"
    assert a_failed[3] == f"block ids [{NUM_BLOCKS}] outside the pool of {NUM_BLOCKS} blocks"
    assert b_failed[4] == "transfer id already in flight on this worker"


def test_unmatched_ends_time_out(transports: list[ZmqTransport], ipc_dir: Path) -> None:
    a, b = random_cache(0), random_cache(1)
    ta, tb = make(transports, ipc_dir, "a", a), make(transports, ipc_dir, "b", b)
    tb.receive(1, [0])  # nobody sends
    ta.send(2, tb.endpoint, [0])  # nobody receives
    ta.send(3, f"ipc://{ipc_dir / 'nobody'}", [0])  # nobody listens
    assert outcome(tb, {1})[1] == {1: f"no sender offered it within {TIMEOUT_S}s"}
    _, failed = outcome(ta, {2, 3})
    # Both ends time out together: whichever says so first names the cause.
    assert failed[2] in (
        f"receiver: no KVReceive for it within {TIMEOUT_S}s",
        f"transfer to {tb.endpoint} was not accepted within {TIMEOUT_S}s",
    )
    assert failed[3] == f"transfer to ipc://{ipc_dir / 'nobody'} was not accepted within {TIMEOUT_S}s"


def test_no_transport_fails_every_transfer() -> None:
    transport = NoTransport()
    transport.send(1, "ipc:///nowhere", [0])
    transport.receive(2, [0])
    transport.receive(3, [0])
    transport.cancel(3)
    assert transport.take_finished() == ([], [TransferFailure(1, "this worker has no KV transfer endpoint"), TransferFailure(2, "this worker has no KV transfer endpoint")])
    assert transport.take_finished() == ([], [])


def test_a_failing_page_read_fails_every_transfer_and_later_ones_at_once(
    transports: list[ZmqTransport], ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device error in the I/O thread (here: reading a page) ends the thread; nothing hangs."""
    a, b = random_cache(0), random_cache(1)
    sender, receiver = make(transports, ipc_dir, "a", a), make(transports, ipc_dir, "b", b)

    def broken_read(block: int) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(a, "read_page", broken_read)
    receiver.receive(1, [0])
    sender.send(1, receiver.endpoint, [0])
    reason = "the KV transfer thread failed: RuntimeError('device lost')"
    assert outcome(sender, {1}) == (set(), {1: reason})
    sender.send(2, receiver.endpoint, [0])
    assert sender.take_finished() == ([], [TransferFailure(2, reason)])
    assert outcome(receiver, {1})[1] == {1: "stream stalled after 0 of 1 blocks"}


def test_endpoints_peers_can_reach() -> None:
    host = socket.gethostname()
    assert advertised_endpoint("tcp://0.0.0.0:5601") == f"tcp://{host}:5601"
    assert advertised_endpoint("tcp://[::]:5601") == f"tcp://{host}:5601"
    assert advertised_endpoint("tcp://10.0.0.2:5601") == "tcp://10.0.0.2:5601"
    assert advertised_endpoint("ipc:///run/paged/w0-kv.sock") == "ipc:///run/paged/w0-kv.sock"
    # A worker not told where to take transfers takes them beside its gateway endpoint.
    assert default_transfer_endpoint("ipc:///run/paged/worker-0.sock") == "ipc:///run/paged/worker-0-kv.sock"
    assert default_transfer_endpoint("tcp://*:5600") == "tcp://*:*"
    assert default_transfer_endpoint("tcp://10.0.0.2:5600") == "tcp://10.0.0.2:*"
    with pytest.raises(ValueError, match="set --kv-transfer-endpoint"):
        default_transfer_endpoint("inproc://worker")
