"""The `--kv-allocator contiguous` baseline: what serving systems did before paging.

Each sequence reserves, on admission, one contiguous run of blocks sized for its whole possible
length (prompt + max_tokens, capped at the context window), found first-fit. Nothing is shared:
no prefix cache, and n > 1 reserves a run per sequence with the prompt copied at the fork. The
interface matches KVCacheManager so the scheduler and benchmarks run unchanged on either; swapping
is not offered (swap_out returns None, so the scheduler falls back to recompute).
"""

from __future__ import annotations

import bisect

from paged.gateway.kv_cache_manager import CacheHit, KVStats, SeqBlocks
from paged.gateway.request import Sequence
from paged.shared.protocol import BlockCopy


class ContiguousAllocator:
    enable_prefix_caching = False

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self.seqs: dict[int, SeqBlocks] = {}
        self._extents: list[tuple[int, int]] = [(0, num_blocks)] if num_blocks else []  # free (start, length), sorted
        self._fork_runs: dict[int, list[list[int]]] = {}  # parent seq id -> runs reserved for its children
        self._filled = 0

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def shared_prompt_blocks(self, prompt_len: int) -> int:
        """Nothing is shared: each sequence has its own run."""
        return 0

    def peak_blocks(self, prompt_len: int, max_num_tokens: int, n: int) -> int:
        return n * self._blocks_for(max_num_tokens)

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

    # The KVCacheManager interface ---------------------------------------------------------------

    def probe(self, seq: Sequence) -> CacheHit:
        return CacheHit()

    def match_prefix(self, token_ids: list[int], cache_salt: str | None) -> int:
        return 0

    def cache_computed(self, seq: Sequence, num_tokens: int) -> None:
        pass

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

    def take_table_delta(self, seq: Sequence) -> tuple[int, list[int]]:
        record = self.seqs[seq.seq_id]
        table_from = record.num_sent
        num_blocks = len(record.table)
        if table_from == num_blocks:
            return table_from, []
        record.num_sent = num_blocks
        return table_from, record.table[table_from:]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].table)

    def holds(self, seq: Sequence) -> bool:
        return seq.seq_id in self.seqs

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

    def stats(self) -> KVStats:
        used = self.num_blocks - self.num_free_blocks
        return KVStats(
            num_blocks=self.num_blocks,
            free_blocks=self.num_free_blocks,
            cached_blocks=0,
            used_blocks=used,
            shared_blocks=0,
            slots_reserved=used * self.block_size,
            slots_filled=self._filled,
            evictions=0,
            host_blocks=0,
            host_free_blocks=0,
        )
