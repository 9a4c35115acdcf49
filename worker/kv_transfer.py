"""Worker-to-worker KV page transfers, for prefill/decode disaggregation (docs/disaggregation.md).

The gateway orders both ends of a transfer in its steps (shared/protocol.py: a KVSend on the worker
holding the blocks, a KVReceive on the one getting them, under one transfer id) and learns the outcome
from each end's StepOutput. A transport moves the bytes: `KVTransport` is what a worker needs of one;
worker/zmq_transport.py implements it over ZeroMQ (ipc:// on one host, tcp:// across hosts), and a
GPU-direct transport (NCCL, RDMA) would implement the same calls. `NoTransport` is a worker's without
a transfer endpoint.
"""

from __future__ import annotations

from typing import Protocol

import torch

from paged.shared.protocol import TransferFailure


class PagePool(Protocol):
    """What a transport reads pages from and writes them to: worker.kv_cache.KVCache."""

    num_blocks: int

    @property
    def page_layout(self) -> str: ...

    @property
    def page_nbytes(self) -> int: ...

    def read_page(self, block: int) -> torch.Tensor: ...

    def write_page(self, block: int, data: torch.Tensor) -> None: ...


class KVTransport(Protocol):
    """Moves KV pages between workers' pools. Called from the worker's main thread between steps; the
    bytes move in the background and outcomes are collected with take_finished()."""

    endpoint: str  # where peers send to this worker ("" when it takes none)

    def send(self, transfer_id: int, peer: str, blocks: list[int]) -> None:
        """Start streaming these device blocks to `peer`, which receives them under `transfer_id`."""
        ...

    def receive(self, transfer_id: int, blocks: list[int]) -> None:
        """Accept `transfer_id`'s pages into these device blocks, the i-th page into blocks[i]."""
        ...

    def cancel(self, transfer_id: int) -> None:
        """Drop a transfer: once this returns none of its pages is read or written, and it is not reported."""
        ...

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        """The transfers that ended since the last call: (done, failed)."""
        ...

    def wait_finished(self, timeout: float) -> None:
        """Return once a transfer has ended or none is in flight, or after `timeout` seconds."""
        ...

    def close(self) -> None: ...


class NoTransport:
    """The transport of a worker without a transfer endpoint: every transfer fails at once."""

    endpoint = ""

    def __init__(self) -> None:
        self._failed: list[TransferFailure] = []

    def send(self, transfer_id: int, peer: str, blocks: list[int]) -> None:
        self._failed.append(TransferFailure(transfer_id, "this worker has no KV transfer endpoint"))

    def receive(self, transfer_id: int, blocks: list[int]) -> None:
        self.send(transfer_id, "", blocks)

    def cancel(self, transfer_id: int) -> None:
        self._failed = [failure for failure in self._failed if failure.transfer_id != transfer_id]

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        failed, self._failed = self._failed, []
        return [], failed

    def wait_finished(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass
