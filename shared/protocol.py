"""The gateway <-> worker wire protocol: msgspec Structs, msgpack on the wire.

One step is the unit of work. The gateway owns every scheduling decision (which sequences run,
which physical blocks they use); the worker owns the KV tensors and the token ids it has computed
or sampled. Because the worker keeps each live sequence's token list and block table, a step only
carries *deltas*: new sequences once, then per step how many tokens to compute and which blocks were
appended. A sequence's table starts empty on the worker: the first ScheduledSeq after its
NewSequence sends the whole table (table_from 0).

Overlapped scheduling: the gateway may send step N+1 before step N's result arrives. A decode in
step N+1 computes the token sampled in step N, which only the worker knows yet; this is why
`ScheduledSeq` names a position range, not token ids.

KV beyond the worker's own pool is also moved by step items, never by side channels: transfers
between workers for prefill/decode disaggregation (`KVSend` on the worker holding the blocks,
`KVReceive` on the one getting them, one gateway-chosen transfer id; see docs/disaggregation.md), and
saves/loads between the pool and the host's shared KV store (see docs/kv-store.md). Both ends of a
transfer report its outcome in their StepOutputs.

The step messages are built by the hundred every step and never take part in a reference cycle,
so they are declared gc=False: the cyclic garbage collector neither tracks them nor is triggered
by their allocation.
"""

from __future__ import annotations

import msgspec

from paged.shared.config import WorkerRole
from paged.shared.sampling_params import SamplingParams

PROTOCOL_VERSION = 3  # 2: NewSequence lost its block_table field; 3: KV transfer and store items
# The integers a message field may hold. msgpack itself carries -2^63..2^64-1 (the encoder raises
# OverflowError beyond, which would fail the whole step), and the worker puts seeds, token ids and
# top-k values into int64 tensors, so int64 it is: the HTTP layer refuses anything outside.
WIRE_INT_MIN = -(1 << 63)
WIRE_INT_MAX = (1 << 63) - 1
# Both ends send a Heartbeat this often; each end's silence timeout is a multiple of it.
HEARTBEAT_INTERVAL_S = 0.25


class NewSequence(msgspec.Struct, gc=False, array_like=True, omit_defaults=True):
    """A sequence the worker has not seen (a new request, or one resumed after recompute)."""

    seq_id: int
    token_ids: list[int]  # prompt, followed by tokens generated before a recompute preemption
    sampling: SamplingParams
    num_output_tokens: int = 0  # how many of token_ids are generated (penalties count only those)


class ScheduledSeq(msgspec.Struct, gc=False, array_like=True, omit_defaults=True):
    """Work for one sequence in one step: compute positions [start, start + num_tokens)."""

    seq_id: int
    start: int  # number of tokens already in the KV cache (== position of the first new token)
    num_tokens: int
    # Block-table delta: truncate the worker's table to `table_from` entries, then append new_blocks.
    # Appends use table_from == len(table); copy-on-write replaces the last entry.
    table_from: int = 0
    new_blocks: list[int] = []
    sample: bool = True  # False for a prefill chunk that does not reach the end of the known tokens
    # n > 1: children forked from this sequence after this step. Each starts with this sequence's
    # tokens and block table and samples its own first token from the same logits.
    fork_ids: list[int] = []


class BlockCopy(msgspec.Struct, gc=False, array_like=True):
    src: int
    dst: int


class KVSend(msgspec.Struct, gc=False, array_like=True):
    """Stream device blocks to another worker, which takes them under the same transfer id."""

    transfer_id: int
    seq_id: int  # whose KV the blocks hold: if this step fails that sequence, the transfer fails too
    peer: str  # the receiving worker's transfer endpoint (its WorkerRegistration.transfer_endpoint)
    blocks: list[int]  # device blocks, in transfer order


class KVReceive(msgspec.Struct, gc=False, array_like=True):
    """Take a transfer's blocks into device blocks: the i-th block sent lands in blocks[i]."""

    transfer_id: int
    blocks: list[int]


class StepInput(msgspec.Struct, gc=False, omit_defaults=True):
    """One iteration. The worker applies, in order: transfer cancels, frees, store saves, swap-outs,
    swap-ins, store loads, copies, transfer receives, new sequences; then runs the forward pass for
    `scheduled` and samples; then starts the transfer sends (so they carry what this step computed).

    Store saves come first because they rescue cached content from blocks this very step reuses;
    cancels come first because the gateway may hand a cancelled transfer's blocks out in this step."""

    step_id: int
    scheduled: list[ScheduledSeq] = []
    new_seqs: list[NewSequence] = []
    freed_seq_ids: list[int] = []  # finished, aborted or recompute-preempted: drop worker state
    swap_out: list[BlockCopy] = []  # device block -> host block (src is device)
    swap_in: list[BlockCopy] = []  # host block -> device block (src is host)
    copies: list[BlockCopy] = []  # device -> device, copy-on-write
    store_saves: list[BlockCopy] = []  # device block -> KV store slot (src is device)
    store_loads: list[BlockCopy] = []  # KV store slot -> device block (src is the slot)
    kv_sends: list[KVSend] = []
    kv_receives: list[KVReceive] = []
    # Transfers to drop: once this step starts, none of their blocks is read or written again, and
    # neither end reports them any more.
    kv_cancels: list[int] = []
    # With nothing scheduled: wait up to this long for an in-flight transfer to finish before
    # answering, so that a gateway polling for transfers does not spin.
    transfer_wait_s: float = 0.0


# The step items that belong to one sequence, each naming it by its seq_id: a fault in one of them
# fails that sequence alone, on either end (gateway/unencodable_items.py, worker/step_decoding.py).
# Every other item is a block or transfer id the gateway chose itself.
SEQUENCE_ITEMS: dict[str, type[NewSequence | ScheduledSeq | KVSend]] = {
    "new_seqs": NewSequence,
    "scheduled": ScheduledSeq,
    "kv_sends": KVSend,
}


class TokenLogprob(msgspec.Struct, gc=False, array_like=True):
    token_id: int
    logprob: float


class SeqResult(msgspec.Struct, gc=False, array_like=True, omit_defaults=True):
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None


class SeqError(msgspec.Struct, gc=False, array_like=True):
    seq_id: int
    message: str


class TransferFailure(msgspec.Struct, gc=False, array_like=True):
    transfer_id: int
    reason: str


class StepOutput(msgspec.Struct, gc=False, omit_defaults=True):
    step_id: int
    results: list[SeqResult] = []
    errors: list[SeqError] = []  # sequences this step failed for; the rest of the batch is unaffected
    forward_s: float = 0.0  # time in the model forward + sampling
    total_s: float = 0.0  # time from receiving the step to sending the result
    store_save_s: float = 0.0  # time saving pages to the KV store
    store_load_s: float = 0.0  # time loading pages from the KV store
    # The step's page movements (store saves, swaps, store loads, copies) failed: none of the pages
    # they write can be trusted, and its sequences failed with it.
    page_moves_failed: bool = False
    # Transfers that ended since the previous output, as this end saw them. Done means the receiver
    # holds every block: the receiver reports it once the last block is written, the sender once the
    # receiver acknowledged that. A failed transfer touches none of its blocks any more, on this end.
    transfers_done: list[int] = []
    transfers_failed: list[TransferFailure] = []


# --- Session messages (registration, liveness) and framing -----------------------------------------
#
# Sockets: the worker binds a ROUTER, the gateway connects a DEALER. ROUTER tags every message with
# the sender's identity, so the worker knows which gateway it serves and drops anything from another
# peer; a DEALER reconnects by itself, and the gateway opens a fresh one (a fresh identity) whenever
# it (re)registers, so no step queued for a dead worker is ever delivered to its successor.
#
# Session: gateway Hello -> worker WorkerRegistration -> gateway RegistrationAck (or
# RegistrationRefused) -> steps and outputs, with Heartbeats both ways, until Shutdown or silence.


class Hello(msgspec.Struct, array_like=True):
    """Gateway -> worker, repeated until the worker registers: "serve me"."""

    protocol_version: int
    gateway_id: str


class WorkerRegistration(msgspec.Struct, array_like=True):
    """Worker -> gateway: what this worker is and how much KV it holds. Sent for every Hello; a
    registering worker has no sequences, whatever it ran before."""

    protocol_version: int
    worker_id: str
    num_blocks: int
    num_host_blocks: int
    block_size: int
    max_model_len: int
    model: str  # model identity: checkpoint path, "builtin" or "null"
    device: str
    dtype: str
    pid: int
    role: WorkerRole = "mixed"  # what the gateway should use it for; the worker itself executes any step
    transfer_endpoint: str = ""  # where other workers send it KV blocks ("": it takes no transfers)
    kv_store_id: str = ""  # the host KV store it attached ("": none); workers with equal ids share one store
    num_store_slots: int = 0
    # Bytes of one KV page (a block's K and V in every layer): a store slot's size, what a transfer moves per block.
    page_bytes: int = 0
    # What one block of context adds to the cost of computing a token, relative to its cost without
    # context (from the model's shape): how the depth eviction policy weighs a block's depth.
    block_context_cost: float = 0.0


class RegistrationAck(msgspec.Struct, array_like=True):
    """Gateway -> worker: from now on this gateway owns the worker."""

    gateway_id: str


class RegistrationRefused(msgspec.Struct, array_like=True):
    reason: str


class Heartbeat(msgspec.Struct, array_like=True):
    sent_at: float  # sender's time.time(), for logs only: intervals are measured by the receiver


class Shutdown(msgspec.Struct, array_like=True):
    reason: str


Message = Hello | WorkerRegistration | RegistrationAck | RegistrationRefused | Heartbeat | Shutdown | StepInput | StepOutput

# One byte per message type, after one byte of protocol version: frames are [header, msgpack payload].
MESSAGE_TYPES: dict[int, type] = {
    1: Hello,
    2: WorkerRegistration,
    3: RegistrationAck,
    4: RegistrationRefused,
    5: Heartbeat,
    6: Shutdown,
    7: StepInput,
    8: StepOutput,
}


class ProtocolError(ValueError):
    """A message that cannot be decoded: the receiver logs it with the peer and drops it."""


class ProtocolVersionError(ProtocolError):
    """A well-formed header from a peer speaking another protocol version: refuse the peer."""

    def __init__(self, peer_version: int) -> None:
        super().__init__(f"peer speaks protocol version {peer_version}, this side speaks {PROTOCOL_VERSION}")
        self.peer_version = peer_version


class UnencodableMessage(ProtocolError):
    """A message holds a value msgpack cannot carry (an integer beyond 64 bits, an unknown type)."""


# What msgspec raises for a value it cannot encode: OverflowError beyond -2^63..2^64-1, TypeError
# for a type it does not know.
ENCODE_ERRORS = (OverflowError, TypeError, ValueError, msgspec.EncodeError)


def explain_unencodable(value: object) -> str | None:
    """Where in `value` encoding fails and why ("sampling.seed: can't serialize ints < ..."), or
    None when it encodes. For a value suspected to fail: it encodes every part on the way down."""
    reason = _explain(value)
    return None if reason is None else reason.removeprefix(".")


def _explain(value: object) -> str | None:
    try:
        msgspec.msgpack.encode(value)
    except ENCODE_ERRORS as exc:
        return _locate(value) or str(exc)
    return None


def _locate(value: object) -> str | None:
    """The first failing part of a container, as a path (".field", "[index]") and the reason."""
    parts: list[tuple[str, object]]
    if isinstance(value, msgspec.Struct):
        parts = [(f".{name}", getattr(value, name)) for name in value.__struct_fields__]
    elif isinstance(value, (list, tuple)):
        parts = [(f"[{index}]", item) for index, item in enumerate(value)]
    elif isinstance(value, dict):
        parts = [(f"[{key!r}]", item) for key, item in value.items()]
    else:
        return None
    for name, part in parts:
        if (reason := _explain(part)) is not None:
            return f"{name}{'' if reason.startswith(('.', '[')) else ': '}{reason}"
    return None


class Codec:
    """Encodes messages to frames and decodes frames back. Encoding raises UnencodableMessage,
    decoding ProtocolError, never anything else."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._headers = {cls: bytes((PROTOCOL_VERSION, code)) for code, cls in MESSAGE_TYPES.items()}
        self._decoders = {code: msgspec.msgpack.Decoder(cls) for code, cls in MESSAGE_TYPES.items()}

    def encode(self, message: Message) -> list[bytes]:
        try:
            payload = self._encoder.encode(message)
        except ENCODE_ERRORS as exc:
            raise UnencodableMessage(f"{type(message).__name__} cannot be encoded: {exc}") from None
        return [self._headers[type(message)], payload]

    def decode(self, frames: list[bytes]) -> Message:
        if len(frames) != 2:
            raise ProtocolError(f"expected 2 frames (header, payload), got {len(frames)}")
        header, payload = frames
        if len(header) != 2:
            raise ProtocolError(f"bad header of {len(header)} bytes")
        version, code = header
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(version)
        decoder = self._decoders.get(code)
        if decoder is None:
            raise ProtocolError(f"unknown message type {code}")
        try:
            return decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"undecodable {MESSAGE_TYPES[code].__name__}: {exc}") from None
