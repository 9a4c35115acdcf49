"""Flatten one step's scheduled sequences into the model's inputs.

Sequence b computes positions [start_b, start_b + num_tokens_b); its tokens are laid out back to back
with no padding. Everything per token (positions, slot mapping) is derived with numpy array ops, so a
decode batch of hundreds of sequences costs a few vector operations, not a Python loop per token.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from paged.shared.protocol import ScheduledSeq
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.sequence_state import SequenceState


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [S]: row of each sampling sequence's last token in the flat batch
    sample_seq_ids: list[int]  # seq_id of each sample row, in order


def check_scheduled(seq: ScheduledSeq, state: SequenceState, block_size: int, max_model_len: int) -> None:
    """Raise ValueError if `seq` cannot run against `state` (after its block-table delta was applied;
    the block ids themselves are checked as they arrive)."""
    end = seq.start + seq.num_tokens
    if seq.start < 0 or seq.num_tokens < 1:
        raise ValueError(f"invalid token range start={seq.start} num_tokens={seq.num_tokens}")
    if end > state.num_tokens:
        raise ValueError(f"positions up to {end} requested but only {state.num_tokens} tokens are known")
    if seq.sample and end != state.num_tokens:
        raise ValueError(f"sampling after {end} tokens, but {state.num_tokens} are known: it would not be the next token")
    if end > max_model_len:
        raise ValueError(f"positions up to {end} exceed max_model_len={max_model_len}")
    needed_blocks = -(-end // block_size)
    if len(state.block_table) < needed_blocks:
        raise ValueError(f"{end} tokens need {needed_blocks} blocks, block table has {len(state.block_table)}")


def prepare_inputs(
    scheduled: Sequence[ScheduledSeq],
    states: Mapping[int, SequenceState],
    block_size: int,
    device: torch.device,
) -> ModelInput:
    """Build the flat batch for `scheduled` (non-empty, already checked with check_scheduled)."""
    num_seqs = len(scheduled)
    seq_states = [states[seq.seq_id] for seq in scheduled]
    starts = np.fromiter((seq.start for seq in scheduled), dtype=np.int64, count=num_seqs)
    query_lens = np.fromiter((seq.num_tokens for seq in scheduled), dtype=np.int64, count=num_seqs)
    seq_lens = starts + query_lens
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    input_ids = np.fromiter(
        itertools.chain.from_iterable(
            state.token_slice(seq.start, seq.start + seq.num_tokens) for seq, state in zip(scheduled, seq_states)
        ),
        dtype=np.int64,
        count=num_tokens,
    )

    # Block tables, right-padded with block 0 (masked out by seq_lens in attention).
    table_lens = np.fromiter((len(state.block_table) for state in seq_states), dtype=np.int64, count=num_seqs)
    max_blocks = int(table_lens.max())
    block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
    block_tables[np.arange(max_blocks) < table_lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(state.block_table for state in seq_states), dtype=np.int32, count=int(table_lens.sum())
    )

    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
    positions = np.arange(num_tokens, dtype=np.int64) + (starts - query_start_loc[:-1])[seq_of_token]
    slot_mapping = block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size

    sampling = np.fromiter((seq.sample for seq in scheduled), dtype=bool, count=num_seqs)
    sample_rows = query_start_loc[1:][sampling] - 1

    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)).to(device),
        seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
        block_tables=torch.from_numpy(block_tables).to(device),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    return ModelInput(
        input_ids=torch.from_numpy(input_ids).to(device),
        positions=torch.from_numpy(positions).to(device),
        meta=meta,
        sample_rows=torch.from_numpy(sample_rows).to(device),
        sample_seq_ids=[seq.seq_id for seq, s in zip(scheduled, sampling) if s],
    )
