"""TokenHistory, the per-sequence penalty state kept up to date token by token, against counting the
token lists from scratch; and the sequence state that owns it (created only for penalized sampling,
updated on append, copied on fork)."""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.shared.sampling_params import SamplingParams
from paged.worker.sampler import _apply_penalties
from paged.worker.sampling_batch import SamplingBatch
from paged.worker.sequence_state import SequenceState
from paged.worker.token_history import TokenHistory

tokens = st.lists(st.integers(0, 40), max_size=60)


def assert_matches(history: TokenHistory, prompt: list[int], output: list[int]) -> None:
    assert sorted(history.seen_ids.tolist()) == sorted(set(prompt + output))
    counts = Counter(output)
    assert dict(zip(history.output_ids.tolist(), history.output_counts.tolist())) == counts


@settings(max_examples=60, deadline=None)
@given(tokens, tokens, tokens)
def test_history_equals_counting_from_scratch(prompt: list[int], output: list[int], appended: list[int]) -> None:
    history = TokenHistory(prompt, output)
    assert_matches(history, prompt, output)
    for token in appended:  # past the initial capacity: the arrays grow
        history.append(token)
    assert_matches(history, prompt, output + appended)


def test_copies_are_independent() -> None:
    parent = TokenHistory([1, 2], [3])
    child = parent.copy()
    child.append(9)
    parent.append(3)
    assert_matches(parent, [1, 2], [3, 3])
    assert_matches(child, [1, 2], [3, 9])


def test_sequence_state_keeps_a_history_only_for_penalized_sampling() -> None:
    plain = SequenceState.from_tokens([1, 2, 3], 1, [0], SamplingParams())
    assert plain.history is None
    penalized = SequenceState.from_tokens([1, 2, 3, 4], 2, [0], SamplingParams(frequency_penalty=0.5))
    assert penalized.history is not None
    assert_matches(penalized.history, [1, 2], [3, 4])
    penalized.append_token(4)
    fork = penalized.fork(1)
    fork.append_token(7)
    assert_matches(penalized.history, [1, 2], [3, 4, 4])
    assert fork.history is not None
    assert_matches(fork.history, [1, 2], [3, 4, 4, 7])


def test_penalties_from_kept_histories_equal_penalties_from_token_lists() -> None:
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=-0.5),
    ]
    prompts, outputs = [[5, 6, 6], [1], [2, 9]], [[6, 7], [3], [9, 9, 4]]
    states = [SequenceState.from_tokens(p + o[:1], 1, [0], s) for p, o, s in zip(prompts, outputs, params)]
    for state, output in zip(states, outputs):
        for token in output[1:]:
            state.append_token(token)
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    kept = SamplingBatch.build(params, prompts, outputs, 12, "cpu", [state.history for state in states])
    rebuilt = SamplingBatch.build(params, prompts, outputs, 12, "cpu")
    assert kept.penalties is not None and rebuilt.penalties is not None
    assert torch.equal(_apply_penalties(logits, kept.penalties), _apply_penalties(logits, rebuilt.penalties))
    # The unpenalized row is untouched, bit for bit, and the input logits are not modified.
    assert torch.equal(_apply_penalties(logits, kept.penalties)[1], logits[1])
    assert torch.equal(logits, before)
