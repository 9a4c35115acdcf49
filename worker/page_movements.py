"""The KV page movements a step orders on one worker, beside its forward pass: within the page pool
(swaps to and from the host pool, copy-on-write copies), to and from the host's shared KV store
(worker/kv_store.py), and to and from other workers' pools through a KV transport
(worker/kv_transfer.py). The store and the transport are optional.

Order within a step (shared/protocol.py): cancels first, so that blocks of a cancelled transfer are
never touched again; then store saves, swaps, store loads and copies, before anything reads the pages;
receives are registered before the forward pass, sends start after it (they carry the pages it
computes).
"""

from __future__ import annotations

import time

import torch

from paged.shared.config import KVSharingConfig
from paged.shared.protocol import StepInput, TransferFailure
from paged.worker.kv_cache import KVCache
from paged.worker.kv_store import KVStoreArena
from paged.worker.kv_transfer import KVTransport, NoTransport
from paged.worker.zmq_transport import ZmqTransport


class PageMovements:
    def __init__(self, kv_cache: KVCache, sharing: KVSharingConfig, dtype: torch.dtype) -> None:
        """Opens the KV transport (if `sharing` names an endpoint) and attaches the host's KV store (if it has memory)."""
        self.kv_cache = kv_cache
        self.transport: KVTransport = NoTransport()
        if sharing.kv_transfer_endpoint:
            self.transport = ZmqTransport(kv_cache, sharing.kv_transfer_endpoint, sharing.kv_transfer_timeout)
        self.store: KVStoreArena | None = None
        if sharing.kv_offload_memory:
            self.store = KVStoreArena.open(sharing.kv_store_name, sharing.kv_offload_memory, kv_cache.page_shape, dtype)

    @property
    def transfer_endpoint(self) -> str:
        return self.transport.endpoint

    @property
    def kv_store_id(self) -> str:
        return self.store.store_id if self.store else ""

    @property
    def num_store_slots(self) -> int:
        return self.store.num_slots if self.store else 0

    def close(self) -> None:
        """Stop the KV transport and unmap the KV store (the store itself stays for the host's other workers)."""
        self.transport.close()
        if self.store is not None:
            self.store.close()

    def cancel(self, step: StepInput) -> None:
        for transfer_id in step.kv_cancels:
            self.transport.cancel(transfer_id)

    def move(self, step: StepInput) -> tuple[float, float]:
        """The step's page movements in protocol order: store saves, swaps, store loads, copies.
        Returns the seconds spent saving to and loading from the KV store."""
        kv_cache = self.kv_cache
        save_s = load_s = 0.0
        if step.store_saves:
            started = time.perf_counter()
            kv_cache.save(self._store_pages(), step.store_saves, "store save")
            save_s = time.perf_counter() - started
        kv_cache.swap_out(step.swap_out)
        kv_cache.swap_in(step.swap_in)
        if step.store_loads:
            started = time.perf_counter()
            kv_cache.load(self._store_pages(), step.store_loads, "store load")
            load_s = time.perf_counter() - started
        kv_cache.copy_blocks(step.copies)
        return save_s, load_s

    def _store_pages(self) -> torch.Tensor:
        if self.store is None:
            raise ValueError("this worker has no KV store (--kv-offload-memory)")
        return self.store.pages

    @staticmethod
    def not_started(step: StepInput, exc: Exception) -> list[TransferFailure]:
        """Every transfer the step orders, failed: its page movements failed before any started."""
        return [
            TransferFailure(item.transfer_id, f"step {step.step_id} failed before the transfer started: {exc}")
            for item in (*step.kv_receives, *step.kv_sends)
        ]

    def receive(self, step: StepInput) -> None:
        for receive in step.kv_receives:
            self.transport.receive(receive.transfer_id, receive.blocks)

    def send(self, step: StepInput, errors: dict[int, str]) -> list[TransferFailure]:
        """Start the step's sends (after its forward pass); a send of a sequence in `errors` fails
        instead, since its pages may hold garbage. Waits for a transfer to end on a polling step."""
        failed: list[TransferFailure] = []
        for send in step.kv_sends:
            if send.seq_id in errors:
                failed.append(TransferFailure(send.transfer_id, f"sequence {send.seq_id} failed: {errors[send.seq_id]}"))
            else:
                self.transport.send(send.transfer_id, send.peer, send.blocks)
        if step.transfer_wait_s and not step.scheduled:
            self.transport.wait_finished(step.transfer_wait_s)
        return failed

    def take_finished(self) -> tuple[list[int], list[TransferFailure]]:
        """The transfers that ended since the last call: (done, failed)."""
        return self.transport.take_finished()
