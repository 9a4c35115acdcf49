"""What the worker remembers about each live sequence between steps.

The gateway sends only deltas (see shared/protocol.py): the worker keeps every sequence's token ids
(it appends the tokens it samples) and its block table (it applies the appended/replaced blocks).
Prompt and generated tokens are kept apart because the sampler's penalties and seeds read them apart;
the split also lets a decode step read its one token without copying the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from paged.shared.sampling_params import SamplingParams
from paged.worker.token_history import TokenHistory, has_penalties


@dataclass
class SequenceState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # every generated token, including those from before a recompute preemption
    block_table: list[int]
    sampling: SamplingParams
    history: TokenHistory | None = None  # kept only for a sequence whose sampling has penalties

    @classmethod
    def from_tokens(
        cls, token_ids: list[int], num_output_tokens: int, block_table: list[int], sampling: SamplingParams
    ) -> SequenceState:
        """Split a NewSequence's token list: the last `num_output_tokens` are generated ones."""
        split = len(token_ids) - num_output_tokens
        prompt, output = list(token_ids[:split]), list(token_ids[split:])
        history = TokenHistory(prompt, output) if has_penalties(sampling) else None
        return cls(prompt, output, list(block_table), sampling, history)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - num_prompt)]

    def update_block_table(self, table_from: int, new_blocks: list[int]) -> None:
        """Truncate the table to `table_from` entries, then append `new_blocks`."""
        if not 0 <= table_from <= len(self.block_table):
            raise ValueError(f"table_from={table_from} outside the block table of {len(self.block_table)} blocks")
        del self.block_table[table_from:]
        self.block_table.extend(new_blocks)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.history is not None:
            self.history.append(token_id)

    def fork(self, child_number: int) -> SequenceState:
        """Child `child_number` (1-based) of an n > 1 request: the same tokens and blocks so far.

        A seeded parent gives its children seed + child_number, so that each child draws different
        tokens and yet the whole request stays reproducible.
        """
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + child_number)
        history = None if self.history is None else self.history.copy()
        return SequenceState(list(self.prompt_token_ids), list(self.output_token_ids), list(self.block_table), sampling, history)
