"""Worker layouts: how many workers of each role a gateway drives (docs/disaggregation.md).

A layout is counts followed by role letters, in worker order: `1p1d` is one prefill worker then one
decode worker, `2p1d` two prefill and one decode, `1p1d1m` adds a mixed one; a bare number is that
many mixed workers (`2` is `2m`). Letters are p (prefill), d (decode) and m (mixed), in any case.
"""

from __future__ import annotations

import re

from paged.shared.config import WorkerRole

ROLE_LETTERS: dict[str, WorkerRole] = {"p": "prefill", "d": "decode", "m": "mixed"}
_PART = re.compile(r"(\d+)([pdm]?)")


def parse_workers_layout(layout: str) -> list[WorkerRole]:
    """The role of each worker, in order; ValueError for anything that is not a layout."""
    text = layout.strip().lower()
    parts = list(_PART.finditer(text))
    if not text or "".join(part.group(0) for part in parts) != text or any(not part.group(2) for part in parts[:-1]):
        raise ValueError(f"{layout!r} is not a workers layout like 2, 1p1d or 2p1d1m (counts of p=prefill, d=decode, m=mixed)")
    roles: list[WorkerRole] = []
    for part in parts:
        roles += [ROLE_LETTERS[part.group(2) or "m"]] * int(part.group(1))
    if not roles:
        raise ValueError(f"workers layout {layout!r} has no worker")
    return roles

