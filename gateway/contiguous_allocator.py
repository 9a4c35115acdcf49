"""The `--kv-allocator contiguous` baseline: what serving systems did before paging.

Each sequence reserves, on admission, one contiguous run of blocks sized for its whole possible
length (prompt + max_tokens, capped at the context window), found first-fit. Nothing is shared:
no prefix cache, and n > 1 reserves a run per sequence with the prompt copied at the fork. It
implements the BlockAllocator protocol (gateway/block_allocator.py), so the scheduler and
benchmarks run unchanged on it; swapping is not offered (swap_out returns None, so the scheduler
falls back to recompute).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from paged.gateway.block_accounting import AccountingReport
from paged.gateway.block_allocator import BlockInfo, BlockTables, CacheHit, SeqBlocks, holders_by_block
from paged.gateway.block_hash import BlockHash
from paged.gateway.request import Sequence
from paged.gateway.stats import PoolStats
from paged.shared.protocol import BlockCopy

FORK_RESERVE = "(fork reserve)"  # the holder the memory map names for runs reserved for children


class ContiguousAllocator(BlockTables):
    kind = "contiguous"
    enable_prefix_caching = False
    grows_on_demand = False
    num_host_blocks = 0

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(block_size)
        self.num_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self._extents: list[tuple[int, int]] = [(0, num_blocks)] if num_blocks else []  # free (start, length), sorted
        self._fork_runs: dict[int, list[list[int]]] = {}  # parent seq id -> runs reserved for its children
        self._filled = 0

    def shared_prompt_blocks(self, prompt_len: int) -> int:
        """Nothing is shared: each sequence has its own run."""
        return 0

    def peak_blocks(self, prompt_len: int, max_num_tokens: int, n: int) -> int:
        return n * self._blocks_for(max_num_tokens)

    def exclusive_blocks(self, seqs: list[Sequence]) -> list[int]:
        """Nothing is shared: a sequence frees its run and the runs reserved for its children."""
        exclusive = []
        for seq in seqs:
            record = self.seqs.get(seq.seq_id)
            reserved = sum(len(run) for run in self._fork_runs.get(seq.seq_id, []))
            exclusive.append(len(record.table) + reserved if record is not None else 0)
        return exclusive

    def num_shared(self, blocks: list[int], taken: Mapping[int, int]) -> int:
        return 0  # no prefix hits

    def will_copy_on_write(self, seq: Sequence) -> bool:
        return False  # a child copies its parent's run into its own at the fork

    # Runs ---------------------------------------------------------------------------------------

    def _take_run(self, length: int) -> list[int] | None:
        for index, (start, free_length) in enumerate(self._extents):
            if free_length >= length:
                if free_length == length:
                    del self._extents[index]
                else:
                    self._extents[index] = (start + length, free_length - length)
                self.num_free_blocks -= length
                return list(range(start, start + length))
        return None

    def _give_back(self, run: list[int]) -> None:
        if not run:
            return
        start, length = run[0], len(run)
        extents = self._extents
        index = bisect.bisect_left(extents, (start, 0))
        if index < len(extents) and extents[index][0] == start + length:  # merge with the next
            length += extents[index][1]
            del extents[index]
        if index and extents[index - 1][0] + extents[index - 1][1] == start:  # merge with the previous
            start, previous = extents[index - 1][0], extents[index - 1][1]
            length += previous
            index -= 1
            del extents[index]
        extents.insert(index, (start, length))
        self.num_free_blocks += len(run)

    def free_extents(self) -> list[tuple[int, int]]:
        return list(self._extents)

    def fork_runs(self) -> list[list[int]]:
        """Runs reserved for children not forked yet."""
        return [run for runs in self._fork_runs.values() for run in runs]

    # The BlockAllocator protocol ----------------------------------------------------------------

    def probe(self, seq: Sequence) -> CacheHit:
        return CacheHit()

    def match_prefix(self, token_ids: list[int], cache_salt: str | None) -> int:
        return 0

    def cache_computed(self, seq: Sequence, num_tokens: int) -> None:
        pass

    def completed_hashes(self, seq: Sequence, start: int, end: int) -> list[BlockHash]:
        return []

    def announce_computing(self, step_id: int, seq: Sequence, start: int, end: int) -> None:
        pass

    def settle_step(self, step_id: int, failed_seq_ids: set[int]) -> list[int]:
        return []

    def evict_cached_free(self) -> int:
        return 0

    def forget_blocks(self, blocks: list[int]) -> list[int]:
        return []  # nothing is cached

    def admit(self, seq: Sequence, hit: CacheHit, num_new_tokens: int, reserve_blocks: int, num_children: int = 0) -> bool:
        length = self._blocks_for(seq.max_num_tokens)
        if self.num_free_blocks - length * (1 + num_children) < reserve_blocks:
            return False
        runs: list[list[int]] = []
        for _ in range(1 + num_children):
            run = self._take_run(length)
            if run is None:
                for taken in runs:
                    self._give_back(taken)
                return False
            runs.append(run)
        self.seqs[seq.seq_id] = SeqBlocks(runs[0], num_new_tokens)
        self._filled += num_new_tokens
        if num_children:
            self._fork_runs[seq.seq_id] = runs[1:]
        return True

    def grow(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy] | None:
        record = self.seqs[seq.seq_id]
        if record.num_slots + num_new_tokens > len(record.table) * self.block_size:
            raise ValueError(f"sequence {seq.seq_id} outgrew its reservation")
        record.num_slots += num_new_tokens
        self._filled += num_new_tokens
        return []

    def fork(self, parent: Sequence, child: Sequence) -> list[BlockCopy]:
        """The child takes a run reserved at admission; returns the prompt copies, which the worker
        must make after the forking step and before the parent's blocks can be reused."""
        record = self.seqs[parent.seq_id]
        run = self._fork_runs[parent.seq_id].pop()
        self.seqs[child.seq_id] = SeqBlocks(run, record.num_slots)
        self._filled += record.num_slots
        num_written = self._blocks_for(record.num_slots)
        return [BlockCopy(src, dst) for src, dst in zip(record.table[:num_written], run[:num_written], strict=True)]

    def share_prefix(self, source: Sequence, seq: Sequence, num_blocks: int) -> None:
        raise ValueError("the contiguous allocator shares no blocks: shared_prompt_blocks() is always 0")

    def free(self, seq: Sequence) -> None:
        record = self.seqs.pop(seq.seq_id, None)
        if record is None:
            return
        self._filled -= record.num_slots
        self._give_back(record.table)
        for run in self._fork_runs.pop(seq.seq_id, []):
            self._give_back(run)

    def swap_out(self, seqs: list[Sequence]) -> list[BlockCopy] | None:
        return None

    def swap_in(self, seqs: list[Sequence], reserve_blocks: int) -> list[BlockCopy] | None:
        return None

    def stats(self) -> PoolStats:
        used = self.num_blocks - self.num_free_blocks
        return PoolStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            free_blocks=self.num_free_blocks,
            used_blocks=used,
            slots_reserved=used * self.block_size,
            slots_filled=self._filled,
        )

    def describe(self, names: Mapping[int, str]) -> list[BlockInfo]:
        """Runs reserved for sequences (filled up to their slots) and for children not forked yet."""
        holders = holders_by_block(self.seqs, names)
        blocks = [BlockInfo(block, "free") for block in range(self.num_blocks)]
        size = self.block_size
        for record in self.seqs.values():
            for index, block in enumerate(record.table):
                fill = min(size, max(0, record.num_slots - index * size))
                blocks[block] = BlockInfo(block, "held", 1, fill, holders.get(block, []))
        for run in self.fork_runs():
            for block in run:
                blocks[block] = BlockInfo(block, "held", 1, 0, [FORK_RESERVE])
        return blocks

    def audit(self) -> AccountingReport:
        """Free extents and reserved runs (of sequences and of children to fork) partition the pool."""
        report = AccountingReport()
        owners = [0] * self.num_blocks
        runs = [record.table for record in self.seqs.values()] + self.fork_runs()
        for run in runs:
            if run != list(range(run[0], run[0] + len(run))):
                report.problems.append(f"run starting at {run[0]} is not contiguous")
            for block in run:
                owners[block] += 1
        for start, length in self._extents:
            for block in range(start, start + length):
                owners[block] += 1
                report.num_free += 1
        report.num_held = self.num_blocks - report.num_free
        for block, count in enumerate(owners):
            if count != 1:
                report.problems.append(f"block {block} is owned {count} times (free extents + runs)")
        if self.num_free_blocks != report.num_free:
            report.problems.append(f"free counter {self.num_free_blocks}, counted {report.num_free}")
        return report
