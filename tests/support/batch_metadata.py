"""AttentionMetadata for a hand-built test batch, from per-sequence lengths, as worker/input_batch.py
derives it from a scheduled step."""

from __future__ import annotations

import torch

from paged.worker.attention.metadata import AttentionMetadata


def batch_metadata(slot_mapping: torch.Tensor, query_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor) -> AttentionMetadata:
    """Sequence b has seq_lens[b] tokens cached after this step, the last query_lens[b] of them new."""
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
