"""Blocks a paged pool holds for KV transfers coming in from another worker (prefill/decode
disaggregation, gateway/handoff.py), by transfer id: the prefix-cache hits the transfer skips first,
then the blocks its pages land in. A hold becomes the block table of the transferred sequences once
the pages are in (KVCacheManager.adopt_transfer), or goes back to the pool when the transfer fails
or is cancelled. Until then nothing of it is registered in the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged.gateway.block_pool import BlockPool


@dataclass(slots=True)
class TransferHold:
    table: list[int]  # the sequence's table to be: prefix-cache hits first, then the blocks the pages land in
    num_hits: int  # leading blocks already cached here, which the transfer skips

    @property
    def receive_blocks(self) -> list[int]:
        return self.table[self.num_hits :]


class TransferHolds:
    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._holds: dict[int, TransferHold] = {}

    def hold(self, transfer_id: int, hits: list[int], num_new: int, reserve_blocks: int) -> TransferHold | None:
        """Hold the cached `hits`, then `num_new` fresh blocks, if that leaves `reserve_blocks` free."""
        pool = self._pool
        if not pool.has_room(num_new, hits, reserve_blocks):
            return None
        pool.touch(hits)
        hold = TransferHold(hits + pool.allocate(num_new), len(hits))
        self._holds[transfer_id] = hold
        return hold

    def get(self, transfer_id: int) -> TransferHold | None:
        return self._holds.get(transfer_id)

    def take(self, transfer_id: int) -> TransferHold:
        """The pages are in: the hold's blocks pass to the block tables that adopt them."""
        return self._holds.pop(transfer_id)

    def release(self, transfer_id: int) -> None:
        """Give a transfer's held blocks back (it failed or was cancelled), tail first."""
        hold = self._holds.pop(transfer_id, None)
        if hold is not None:
            self._pool.free(reversed(hold.table))

    def tables(self) -> list[list[int]]:
        """Every hold's blocks (they hold references, like block tables: for the audit)."""
        return [hold.table for hold in self._holds.values()]

    def name_holders(self, holders: dict[int, list[str]]) -> None:
        """Add each held block's transfer to its holders (the memory map's names)."""
        for transfer_id, hold in self._holds.items():
            for block in hold.table:
                holders.setdefault(block, []).append(f"transfer-{transfer_id}")
