"""The link protocol between two workers' ZmqTransports (worker/zmq_transport.py).

Each worker binds a ROUTER at its transfer endpoint and connects one DEALER per peer it sends to.

    sender   -> Offer(id, num_blocks, page layout)
    receiver -> Ready(id)       as soon as its own step registered the KVReceive (an Offer may come first)
    sender   -> Block(id, i) + page bytes, for each block, as fast as the socket takes them
    receiver -> Done(id)        once the last page is written into its pool

Either side may send Fail(id, reason) instead. Each message is one msgpack frame (a tagged array);
a Block is followed by a second frame, the page's bytes as KVCache.read_page gives them.
"""

from __future__ import annotations

import msgspec


class Offer(msgspec.Struct, tag=1, array_like=True):
    transfer_id: int
    num_blocks: int
    layout: str  # KVCache.page_layout of the sender


class Ready(msgspec.Struct, tag=2, array_like=True):
    transfer_id: int


class Block(msgspec.Struct, tag=3, array_like=True):
    """Header frame; the page's bytes follow as a second frame."""

    transfer_id: int
    index: int


class Done(msgspec.Struct, tag=4, array_like=True):
    transfer_id: int


class Fail(msgspec.Struct, tag=5, array_like=True):
    transfer_id: int
    reason: str


LinkMessage = Offer | Ready | Block | Done | Fail
