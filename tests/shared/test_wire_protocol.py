"""The gateway <-> worker framing: every message round-trips, and no byte string decodes to
anything but a message or a ProtocolError (never a crash)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paged.shared.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BlockCopy,
    Codec,
    Heartbeat,
    Hello,
    KVReceive,
    KVSend,
    NewSequence,
    WIRE_INT_MAX,
    WIRE_INT_MIN,
    ProtocolError,
    ProtocolVersionError,
    RegistrationAck,
    RegistrationRefused,
    ScheduledSeq,
    SeqError,
    SeqResult,
    Shutdown,
    StepInput,
    StepOutput,
    TokenLogprob,
    TransferFailure,
    UnencodableMessage,
    WorkerRegistration,
    explain_unencodable,
)
from paged.shared.sampling_params import SamplingParams

MESSAGES = [
    Hello(PROTOCOL_VERSION, "gw"),
    WorkerRegistration(PROTOCOL_VERSION, "host:1", 1000, 50, 16, 4096, "/models/x", "cuda:0", "bfloat16", 1234),
    WorkerRegistration(
        PROTOCOL_VERSION, "host:2", 1000, 50, 16, 4096, "/models/x", "cuda:1", "bfloat16", 1235,
        role="decode", transfer_endpoint="tcp://host:5601", kv_store_id="ab12", num_store_slots=300,
        page_bytes=2 << 20, block_context_cost=0.0005,
    ),  # fmt: skip
    RegistrationAck("gw"),
    RegistrationRefused("protocol version 9"),
    Heartbeat(1.5),
    Shutdown("bye"),
    StepInput(
        step_id=7,
        scheduled=[ScheduledSeq(1, 0, 5, 0, [3, 4]), ScheduledSeq(2, 9, 1, 0, [], True, [8, 9])],
        new_seqs=[NewSequence(1, [1, 2, 3, 4, 5], SamplingParams(temperature=0.5, seed=3), 2)],
        freed_seq_ids=[4],
        swap_out=[BlockCopy(1, 2)],
        swap_in=[BlockCopy(3, 4)],
        copies=[BlockCopy(5, 6)],
    ),
    StepInput(
        step_id=8,
        store_saves=[BlockCopy(7, 0)],
        store_loads=[BlockCopy(3, 7)],
        kv_sends=[KVSend(11, 1, "ipc:///run/paged/worker-1-kv.sock", [3, 4])],
        kv_receives=[KVReceive(12, [9, 10, 2])],
        kv_cancels=[10],
        transfer_wait_s=0.05,
    ),
    StepOutput(7, [SeqResult(1, 42, -0.5, [TokenLogprob(42, -0.5)])], [SeqError(2, "boom")], 0.01, 0.02),
    StepOutput(8, store_save_s=0.001, store_load_s=0.002, transfers_done=[11, 12], transfers_failed=[TransferFailure(10, "stream stalled after 2 of 5 blocks")]),
    StepOutput(9, page_moves_failed=True),
]


def test_every_message_type_is_framed() -> None:
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    codec = Codec()
    frames = codec.encode(message)  # type: ignore[arg-type]
    assert len(frames) == 2 and frames[0][0] == PROTOCOL_VERSION
    assert codec.decode(frames) == message


def test_registration_from_a_worker_without_kv_sharing_fields_decodes_with_defaults() -> None:
    """The KV sharing fields are trailing and optional: a registration that stops before them (a
    worker without transfers or store) decodes to a mixed worker that takes no transfers."""
    full = WorkerRegistration(PROTOCOL_VERSION, "h:1", 10, 0, 16, 256, "m", "cpu", "float32", 1)
    header, _ = Codec().encode(full)
    payload = msgspec.msgpack.encode([PROTOCOL_VERSION, "h:1", 10, 0, 16, 256, "m", "cpu", "float32", 1])
    decoded = Codec().decode([header, payload])
    assert decoded == full
    assert (decoded.role, decoded.transfer_endpoint, decoded.kv_store_id, decoded.num_store_slots) == ("mixed", "", "", 0)
    assert (decoded.page_bytes, decoded.block_context_cost) == (0, 0.0)


@pytest.mark.parametrize(
    "frames, error",
    [
        ([], "expected 2 frames"),
        ([b"\x01\x07"], "expected 2 frames"),
        ([b"\x01\x07", b"", b""], "expected 2 frames"),
        ([b"\x01", b""], "bad header"),
        ([bytes((PROTOCOL_VERSION, 99)), b"\x90"], "unknown message type 99"),
        ([bytes((PROTOCOL_VERSION, 7)), b"\xc1"], "undecodable StepInput"),
        ([bytes((PROTOCOL_VERSION, 7)), b"\x81\xa7step_id\xa3abc"], "undecodable StepInput"),
        ([bytes((PROTOCOL_VERSION, 2)), b"\x93\x01\x02\x03"], "undecodable WorkerRegistration"),
        (
            [bytes((PROTOCOL_VERSION, 2)), msgspec.msgpack.encode([PROTOCOL_VERSION, "h", 1, 0, 16, 8, "m", "cpu", "f", 1, "both"])],
            "undecodable WorkerRegistration",
        ),
    ],
)
def test_malformed_frames_raise_protocol_error(frames: list[bytes], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        Codec().decode(frames)


def test_other_version_is_a_version_error() -> None:
    header, payload = Codec().encode(Hello(PROTOCOL_VERSION, "gw"))
    with pytest.raises(ProtocolVersionError) as caught:
        Codec().decode([bytes((PROTOCOL_VERSION + 1, header[1])), payload])
    assert caught.value.peer_version == PROTOCOL_VERSION + 1


@given(st.lists(st.binary(max_size=64), max_size=3))
def test_arbitrary_bytes_never_crash(frames: list[bytes]) -> None:
    try:
        Codec().decode(frames)
    except ProtocolError:
        pass


@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.binary(max_size=128))
def test_arbitrary_payloads_never_crash(code: int, payload: bytes) -> None:
    try:
        Codec().decode([bytes((PROTOCOL_VERSION, code)), payload])
    except ProtocolError:
        pass


@pytest.mark.parametrize("value", [WIRE_INT_MIN, WIRE_INT_MAX])
def test_every_integer_the_api_lets_through_encodes(value: int) -> None:
    """The HTTP layer bounds every integer of a request to [WIRE_INT_MIN, WIRE_INT_MAX]; at both ends a
    step still encodes and decodes (beyond them msgpack or the worker's int64 tensors would fail)."""
    params = SamplingParams(seed=value, top_k=abs(value) - 1, stop_token_ids=(abs(value) - 1,), max_tokens=abs(value) - 1)
    step = StepInput(step_id=1, new_seqs=[NewSequence(seq_id=1, token_ids=[1], sampling=params)])
    codec = Codec()
    assert codec.decode(codec.encode(step)) == step


@pytest.mark.parametrize(
    "sequence, where",
    [
        (NewSequence(1, [1, 2], SamplingParams(seed=1 << 64)), "sampling.seed: "),
        (NewSequence(1, [1, 2], SamplingParams(stop_token_ids=(3, -(1 << 63) - 1))), "sampling.stop_token_ids[1]: "),
        (NewSequence(1, [1, 1 << 70], SamplingParams()), "token_ids[1]: "),
        (NewSequence(1, [1, object()], SamplingParams()), "token_ids[1]: "),  # type: ignore[list-item]
    ],
)
def test_an_unencodable_value_is_an_unencodable_message_and_explained(sequence: NewSequence, where: str) -> None:
    with pytest.raises(UnencodableMessage, match="^StepInput cannot be encoded: "):
        Codec().encode(StepInput(0, new_seqs=[sequence]))
    reason = explain_unencodable(sequence)
    assert reason is not None and reason.startswith(where)
    assert explain_unencodable(NewSequence(1, [1, 2], SamplingParams(seed=(1 << 64) - 1))) is None
