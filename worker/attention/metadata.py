"""What an attention call needs to know about a flattened, unpadded batch.

The batch holds B sequences; sequence b contributes query_lens[b] new tokens (a prefill chunk or a
single decode token), laid out back to back: tokens query_start_loc[b] .. query_start_loc[b+1]-1.
Their K/V are written to the page pool first (slot_mapping), then every new token attends to the
sequence's whole cached prefix plus the new tokens up to itself (causal), read through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache for each sequence after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 past each sequence's table
    max_query_len: int
    max_seq_len: int
    # Per-step values a backend derives from the fields above (index maps, masks), built by the first
    # layer that needs them and reused by every other layer of the same forward pass.
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:
        """Tokens already cached before this step, per sequence (the causal offset of its first query)."""
        return self.seq_lens - self.query_lens
