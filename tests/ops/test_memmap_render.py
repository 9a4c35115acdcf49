"""pagedctl memmap's pictures of a pool: runs of wholly free rows collapsed into one line, held and
cached blocks always drawn, shared blocks marked, and a legend that names every request or says how
many it leaves out."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib.image
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from paged.ops.memmap_render import LEGEND_OWNERS, FreeRows, legend_owners, map_rows, owner_colors, render_memmap, write_png

NUM_BLOCKS = 13_000  # about the default CPU pool: 256 MiB of stories260K-sized pages


def pool(held: dict[int, list[str]], cached: set[int] = frozenset(), num_blocks: int = NUM_BLOCKS) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    for i in range(num_blocks):
        if i in held:
            blocks.append({"id": i, "state": "held", "ref": len(held[i]), "holders": held[i], "fill": 4})
        elif i in cached:
            blocks.append({"id": i, "state": "cached"})
        else:
            blocks.append({"id": i, "state": "free"})
    figures = {
        "num_blocks": num_blocks, "block_size": 16, "held": len(held), "shared": sum(len(h) > 1 for h in held.values()),
        "cached": len(cached), "free": num_blocks - len(held) - len(cached), "utilization": len(held) / num_blocks,
        "slots_filled": 4 * len(held), "slots_reserved": 16 * len(held), "slot_utilization": 0.25,
        "internal_fragmentation": 0.75, "external_fragmentation": 0.0, "largest_free_run": num_blocks - 20,
    }  # fmt: skip
    return {"worker": "0", "allocator": "paged", "blocks": blocks, "figures": figures}


def render(memory: dict[str, Any], width: int = 80, collapse: bool = True) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=True)
    console.print(render_memmap(memory, width, collapse))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_a_mostly_free_pool_is_a_few_lines() -> None:
    held = {i: ["req-a"] for i in range(10)} | {i: ["req-a", "req-b"] for i in range(10, 12)} | {9000 + i: ["req-c"] for i in range(5)}
    memory = pool(held, cached={5000, 5001})
    text = render(memory)
    assert len(text.splitlines()) < 20, text
    assert len(render(memory, collapse=False).splitlines()) > 300
    assert " 2" in text and "req-a (12)" in text and "req-b (2)" in text and "req-c (5)" in text
    grid = text.split("\n\n")[0]
    assert grid.count("█") == 2 * 15 and grid.count("░") == 2 * 2 and grid.count(" 2") == 2
    assert "free blocks (36–4967)" in text  # 36 blocks a row at 80 columns: rows 1..137 are free


@given(st.lists(st.sampled_from(["free", "free", "free", "cached", "held"]), max_size=300), st.integers(1, 40))
def test_rows_cover_every_block_once_in_order(states: list[str], per_row: int) -> None:
    blocks = [{"id": i, "state": state} for i, state in enumerate(states)]
    rows = map_rows(blocks, per_row)
    ids: list[int] = []
    for previous, row in zip([None, *rows], rows):
        if isinstance(row, FreeRows):
            assert not isinstance(previous, FreeRows)
            assert all(blocks[i]["state"] == "free" for i in range(row.start, row.stop))
            ids += range(row.start, row.stop)
        else:
            assert any(b["state"] != "free" for b in row) and len(row) <= per_row
            ids += [b["id"] for b in row]
    assert ids == list(range(len(blocks)))
    assert sum(isinstance(r, list) for r in map_rows(blocks, per_row, collapse=False)) == -(-len(blocks) // per_row)


def test_the_legend_names_every_request_or_how_many_are_left_out() -> None:
    held = {i: [f"req-{i:02d}"] for i in range(LEGEND_OWNERS + 8)}
    memory = pool(held, num_blocks=64)
    entries = legend_owners(memory["blocks"], owner_colors(memory["blocks"]))
    assert [label for label, color in entries if color] == [f"req-{i:02d} (1)" for i in range(LEGEND_OWNERS)]
    assert entries[-1] == ("… 8 more requests (pagedctl requests lists them)", None)
    assert "… 8 more requests" in render(memory, width=200)


def test_the_png_of_a_mostly_free_pool_zooms_to_what_is_used(tmp_path: Path) -> None:
    memory = pool({i: ["req-a"] for i in range(40)} | {12_000: ["req-a", "req-b"]})
    collapsed, full = tmp_path / "collapsed.png", tmp_path / "full.png"
    write_png(memory, collapsed)
    write_png(memory, full, collapse=False)
    small, large = matplotlib.image.imread(collapsed), matplotlib.image.imread(full)
    assert small.ndim == 3 and small.shape[0] < 800 < large.shape[0]
