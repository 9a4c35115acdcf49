"""The null worker's KV bookkeeping: it moves no KV, so transfers end at once (done with a transfer
endpoint, failed without one) and store items are accepted against a pretend store, which lets the
gateway's orchestration run against null workers."""

from __future__ import annotations

from paged.shared.config import CacheConfig, KVSharingConfig, MiB, ModelConfig
from paged.shared.protocol import BlockCopy, KVReceive, KVSend, StepInput, TransferFailure
from paged.worker.null_worker import NULL_BYTES_PER_TOKEN, NullWorker


def null_worker(sharing: KVSharingConfig | None) -> NullWorker:
    return NullWorker(ModelConfig(), CacheConfig(block_size=16), 2048, sharing=sharing)


STEP = StepInput(
    0,
    kv_sends=[KVSend(1, 0, "ipc:///peer-kv.sock", [0, 1])],
    kv_receives=[KVReceive(2, [3])],
    store_saves=[BlockCopy(0, 4)],
    store_loads=[BlockCopy(4, 5)],
)


def test_transfers_end_at_once_and_the_store_is_pretend() -> None:
    sharing = KVSharingConfig(kv_transfer_endpoint="ipc:///me-kv.sock", kv_offload_memory=4 * MiB, kv_store_name="host")
    null = null_worker(sharing)
    assert (null.transfer_endpoint, null.kv_store_id) == ("ipc:///me-kv.sock", "null:host")
    assert null.num_store_slots == 4 * MiB // (NULL_BYTES_PER_TOKEN * 16)
    output = null.execute_step(STEP)
    assert (output.transfers_done, output.transfers_failed, output.errors) == ([2, 1], [], [])


def test_without_an_endpoint_transfers_fail() -> None:
    null = null_worker(None)
    assert (null.transfer_endpoint, null.kv_store_id, null.num_store_slots) == ("", "", 0)
    reason = "this worker has no KV transfer endpoint"
    assert null.execute_step(STEP).transfers_failed == [TransferFailure(2, reason), TransferFailure(1, reason)]
