"""Salvaging a step that does not decode whole (worker/step_decoding.py): the items of the
sequences at fault are left out and named, the rest decodes as usual; a fault in the step's own
structure cannot be blamed on a sequence."""

from __future__ import annotations

import msgspec
import pytest

from paged.shared.protocol import Codec, KVSend, NewSequence, ScheduledSeq, StepInput
from paged.shared.sampling_params import SamplingParams
from paged.worker.step_decoding import UnsalvageableStep, is_step, salvage_step


def encoded(step: StepInput) -> list[bytes]:
    return Codec().encode(step)


def test_the_items_of_a_sequence_at_fault_are_left_out_and_named() -> None:
    good = NewSequence(2, [1, 2, 3], SamplingParams(seed=5))
    step = StepInput(
        3,
        new_seqs=[NewSequence(1, [1, "x", 3], SamplingParams()), good],  # type: ignore[list-item]
        scheduled=[ScheduledSeq(1, 0, 3, 0, [1]), ScheduledSeq(2, 0, 3, 0, [2]), ScheduledSeq(4, 1.5, 1, 0, [5])],  # type: ignore[arg-type]
        freed_seq_ids=[7],
        kv_sends=[KVSend(9, 1, "peer", [1]), KVSend(10, 2, "peer", [2])],
    )
    frames = encoded(step)
    assert is_step(frames)
    salvaged, errors = salvage_step(frames[1])
    assert sorted(errors) == [1, 4]
    assert "NewSequence" in errors[1] and "Expected `int`, got `str`" in errors[1]
    assert "ScheduledSeq" in errors[4]
    assert salvaged == StepInput(
        3, new_seqs=[good], scheduled=[ScheduledSeq(2, 0, 3, 0, [2])], freed_seq_ids=[7], kv_sends=[KVSend(10, 2, "peer", [2])]
    )


@pytest.mark.parametrize(
    "payload",
    [
        msgspec.msgpack.encode({"step_id": "three"}),
        msgspec.msgpack.encode({"step_id": 3, "freed_seq_ids": ["x"]}),
        msgspec.msgpack.encode({"step_id": 3, "scheduled": [["x", 0, 1]]}),  # names no sequence
        msgspec.msgpack.encode([3]),
        b"\xc1",
    ],
)
def test_a_fault_no_sequence_owns_is_unsalvageable(payload: bytes) -> None:
    with pytest.raises(UnsalvageableStep):
        salvage_step(payload)
