"""Prefix hits on blocks a step in flight is computing.

A full block joins the prefix cache when the output of the step that computed it comes back
(output_processor.py). With overlapped scheduling the next step is built before that: without this
index, requests admitted meanwhile with the same leading tokens (a shared system prompt arriving in
a burst) would compute those tokens again, each in its own blocks. Here the scheduler announces,
once a step is planned, the full blocks its items complete; a later step's admission may take them
as prefix hits. That is sound because the worker runs steps in order: whatever a later step reads,
the earlier one has written. (vLLM's scheduler registers blocks at allocation for the same reason.)

The announcements of a step end with its output (`step_done`): by then the live sequences'
blocks are in the prefix cache proper. The prefix cache as routing and `match_prefix` see it is
unchanged: only admission on this pool looks here.

An entry is trusted only while the announcing sequence still holds the block at the same index of
its table: a sequence preempted or finished since may have let the block go to other content. If
the worker fails an item, `step_done` names the blocks it was to complete, so that the scheduler
fails whoever took them as hits (their KV would read content that never arrived).
"""

from __future__ import annotations

from collections.abc import Mapping

from paged.gateway.block_allocator import SeqBlocks
from paged.gateway.block_hash import BlockHash


class InFlightBlocks:
    def __init__(self) -> None:
        self._by_hash: dict[BlockHash, tuple[int, int, int]] = {}  # hash -> (block, seq_id, index in its table)
        self._by_step: dict[int, list[tuple[int, int, BlockHash]]] = {}  # step id -> (seq_id, block, hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    def announce(self, step_id: int, seq_id: int, table: list[int], first: int, hashes: list[BlockHash]) -> None:
        """Blocks table[first:len(hashes)] (hashes[i] is block i's) are complete once step `step_id` has run."""
        entries = self._by_step.setdefault(step_id, [])
        by_hash = self._by_hash
        for index in range(first, len(hashes)):
            block_hash = hashes[index]
            if block_hash not in by_hash:
                by_hash[block_hash] = (table[index], seq_id, index)
                entries.append((seq_id, table[index], block_hash))

    def extend_hit(self, hashes: list[BlockHash], blocks: list[int], limit: int, seqs: Mapping[int, SeqBlocks]) -> list[int]:
        """The blocks continuing a prefix hit of `blocks` (the first len(blocks) links of the chain
        `hashes`) with announced ones, up to `limit` links in all."""
        extra: list[int] = []
        by_hash = self._by_hash
        for index in range(len(blocks), limit):
            entry = by_hash.get(hashes[index])
            if entry is None:
                break
            block, seq_id, at = entry
            record = seqs.get(seq_id)
            if record is None or record.swapped or at >= len(record.table) or record.table[at] != block:
                break
            extra.append(block)
        return extra

    def step_done(self, step_id: int, failed_seq_ids: set[int]) -> list[int]:
        """Forget step `step_id`'s announcements; returns the blocks its failed items were to complete."""
        unwritten: list[int] = []
        by_hash = self._by_hash
        for seq_id, block, block_hash in self._by_step.pop(step_id, ()):
            if by_hash.get(block_hash, (None,))[0] == block:
                del by_hash[block_hash]
            if seq_id in failed_seq_ids:
                unwritten.append(block)
        return unwritten
