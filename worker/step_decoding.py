"""A step the worker cannot decode whole is decoded item by item: the items at fault fail their
sequences alone, and the rest of the step runs.

msgpack carries what the gateway had (a string or a float among token ids, a negative block count)
where the step's types do not allow it, and msgspec's typed decoding then refuses the whole
StepInput. Dropping it would leave the gateway without that step's output: the next answer comes
out of order and the gateway drops the link, failing or moving every request on this worker. So
the I/O thread salvages the step: decoded untyped, each sequence's items (SEQUENCE_ITEMS) are
checked against their types one by one, those of a sequence with a bad item are left out and
reported as that sequence's errors, and the rest is decoded as usual. What still does not decode is
the gateway's own structure (step id, frees, block copies): no sequence is at fault, and the step
cannot be answered (`UnsalvageableStep`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from paged.shared.protocol import PROTOCOL_VERSION, SEQUENCE_ITEMS, MESSAGE_TYPES, StepInput

STEP_HEADER = bytes((PROTOCOL_VERSION, next(code for code, cls in MESSAGE_TYPES.items() if cls is StepInput)))


class UnsalvageableStep(ValueError):
    """The step's own structure does not decode: no sequence can be blamed, no output sent."""


def is_step(frames: list[bytes]) -> bool:
    return len(frames) == 2 and frames[0] == STEP_HEADER


def salvage_step(payload: bytes) -> tuple[StepInput, dict[int, str]]:
    """The step without the items of every sequence that has one which does not decode, and each
    such sequence's id with why. Raises UnsalvageableStep when the rest does not decode either."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise UnsalvageableStep(f"not msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise UnsalvageableStep(f"a step is a map, not {type(raw).__name__}")
    errors: dict[int, str] = {}
    for name, item_type in SEQUENCE_ITEMS.items():
        items = raw.get(name)
        for item in items if isinstance(items, list) else ():
            seq_id = _seq_id(item, item_type)
            if seq_id is not None and seq_id not in errors:
                try:
                    msgspec.convert(item, item_type)
                except msgspec.ValidationError as exc:
                    errors[seq_id] = f"the worker could not decode this sequence's {item_type.__name__}: {exc}"
    for name in SEQUENCE_ITEMS:
        if isinstance(items := raw.get(name), list):
            raw[name] = [item for item in items if _seq_id(item, SEQUENCE_ITEMS[name]) not in errors]
    try:
        return msgspec.convert(raw, StepInput), errors
    except msgspec.ValidationError as exc:
        raise UnsalvageableStep(str(exc)) from None


def _seq_id(item: Any, item_type: type) -> int | None:
    """The sequence an array-encoded item names, if it names one at all."""
    index = item_type.__struct_fields__.index("seq_id")
    if isinstance(item, list) and len(item) > index and type(item[index]) is int:
        return item[index]
    return None
