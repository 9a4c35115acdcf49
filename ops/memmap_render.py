"""Drawing a worker's memory map (the admin API's /workers/N/memmap JSON): in the terminal with rich,
one two-character cell per block, or as a PNG with matplotlib for reports. Both use the same
colors: grey free, light blue cached-free, one color per holding request; a shared block (ref
count > 1) shows its ref count (terminal) or a black dot (picture).

A pool is mostly free blocks while it serves little, so both draw it in rows of blocks and, unless
asked for everything, collapse each run of rows that are wholly free into one line: what is held or
cached is what the map shows, and the collapsed lines say how many free blocks lie between."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

FREE_COLOR = "#c8c8c8"
CACHED_COLOR = "#6baed6"
OWNER_COLORS = (
    "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4",
    "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)  # fmt: skip
CELL_WIDTH = 2
ROW_LABEL_WIDTH = 7
LEGEND_OWNERS = 12
PNG_COLUMNS = 64
PNG_ANNOTATE_MAX_BLOCKS = 1024  # above this, ref-count digits would be unreadable in the picture


@dataclass(frozen=True)
class FreeRows:
    """Rows of only free blocks, drawn as one line: block ids [start, stop)."""

    start: int
    stop: int


Row = list[dict[str, Any]]


def map_rows(blocks: list[dict[str, Any]], per_row: int, collapse: bool = True) -> list[Row | FreeRows]:
    """The blocks in rows of `per_row`; with `collapse`, each run of wholly free rows as one FreeRows."""
    rows: list[Row | FreeRows] = []
    for start in range(0, len(blocks), per_row):
        row = blocks[start : start + per_row]
        if not (collapse and all(block["state"] == "free" for block in row)):
            rows.append(row)
        elif rows and isinstance(rows[-1], FreeRows):
            rows[-1] = FreeRows(rows[-1].start, start + len(row))
        else:
            rows.append(FreeRows(start, start + len(row)))
    return rows


def owner_colors(blocks: list[dict[str, Any]]) -> dict[str, str]:
    """Request id -> color, in order of first appearance in the pool (stable for one map)."""
    colors: dict[str, str] = {}
    for block in blocks:
        for holder in block.get("holders", ()):
            if holder not in colors:
                colors[holder] = OWNER_COLORS[len(colors) % len(OWNER_COLORS)]
    return colors


def block_color(block: dict[str, Any], colors: dict[str, str]) -> str:
    if block["state"] == "free":
        return FREE_COLOR
    if block["state"] == "cached":
        return CACHED_COLOR
    holders = block.get("holders") or ["?"]
    return colors.get(min(holders), FREE_COLOR)


def _cell(block: dict[str, Any], colors: dict[str, str]) -> Text:
    state = block["state"]
    if state == "free":
        return Text("··", style=FREE_COLOR)
    if state == "cached":
        return Text("░░", style=CACHED_COLOR)
    ref = block.get("ref", 1)
    if ref == 1:
        return Text("██", style=block_color(block, colors))
    return Text(f"{ref:>2}" if ref < 100 else "++", style=f"bold black on {block_color(block, colors)}")


def _free_rows_label(run: FreeRows) -> str:
    return f"{run.stop - run.start} free blocks ({run.start}–{run.stop - 1})"


def figures_text(figures: dict[str, Any]) -> Text:
    pct = "{:.1%}".format
    return Text(
        f"blocks {figures['num_blocks']} × {figures['block_size']} tokens: {figures['held']} held "
        f"({figures['shared']} shared), {figures['cached']} cached-free, {figures['free']} free\n"
        f"utilization {pct(figures['utilization'])} of blocks held · "
        f"slots filled {figures['slots_filled']}/{figures['slots_reserved']} ({pct(figures['slot_utilization'])})\n"
        f"internal frag. {pct(figures['internal_fragmentation'])} (reserved slots empty) · "
        f"external frag. {pct(figures['external_fragmentation'])} (largest free run {figures['largest_free_run']} "
        f"of {figures['free'] + figures['cached']} allocatable)"
    )


def render_memmap(memory: dict[str, Any], width: int, collapse: bool = True) -> RenderableType:
    blocks = memory["blocks"]
    colors = owner_colors(blocks)
    per_row = max(8, (width - ROW_LABEL_WIDTH) // CELL_WIDTH)
    grid = Text()
    for row in map_rows(blocks, per_row, collapse):
        if isinstance(row, FreeRows):
            grid.append(f"{row.start:>{ROW_LABEL_WIDTH - 1}} ", style="dim").append("·· ", style=FREE_COLOR)
            grid.append(_free_rows_label(row) + "\n", style="dim")
            continue
        grid.append(f"{row[0]['id']:>{ROW_LABEL_WIDTH - 1}} ", style="dim")
        for block in row:
            grid.append_text(_cell(block, colors))
        grid.append("\n")
    legend = Text()
    legend.append("··", style=FREE_COLOR).append(" free  ")
    legend.append("░░", style=CACHED_COLOR).append(" cached-free  ")
    legend.append("██", style=OWNER_COLORS[0]).append(" held (color: request)  ")
    legend.append(" 2", style=f"bold black on {OWNER_COLORS[0]}").append(" shared (ref count)")
    owners = Text()
    for label, color in legend_owners(blocks, colors):
        owners.append("██", style=color).append(f" {label}  ") if color else owners.append(label)
    title = Text(f"worker {memory['worker']} · {memory['allocator']} allocator", style="bold")
    parts: list[RenderableType] = [title, grid, legend]
    if colors:
        parts.append(owners)
    parts.append(figures_text(memory["figures"]))
    return Group(*parts)


def legend_owners(blocks: list[dict[str, Any]], colors: dict[str, str]) -> list[tuple[str, str | None]]:
    """(label, color) per holding request, "id (blocks held)", up to LEGEND_OWNERS of them, then one
    uncolored entry saying how many more there are."""
    held: dict[str, int] = {}
    for block in blocks:
        for holder in set(block.get("holders", ())):
            held[holder] = held.get(holder, 0) + 1
    entries: list[tuple[str, str | None]] = [(f"{owner} ({held[owner]})", color) for owner, color in list(colors.items())[:LEGEND_OWNERS]]
    if len(colors) > LEGEND_OWNERS:
        entries.append((f"… {len(colors) - LEGEND_OWNERS} more requests (pagedctl requests lists them)", None))
    return entries


def write_png(memory: dict[str, Any], path: Path, collapse: bool = True) -> None:
    """The same map as a picture: rows of PNG_COLUMNS blocks (wholly free runs of rows collapsed into
    one labelled band), the legend and the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    blocks = memory["blocks"]
    colors = owner_colors(blocks)
    columns = max(1, min(PNG_COLUMNS, int((len(blocks) * 2) ** 0.5)))
    rows = map_rows(blocks, columns, collapse)
    white = (1.0, 1.0, 1.0)
    image = [
        [white] * columns if isinstance(row, FreeRows) else [to_rgb(block_color(b, colors)) for b in row] + [white] * (columns - len(row))
        for row in rows
    ]  # fmt: skip
    drawn = [(y, x, block) for y, row in enumerate(rows) if not isinstance(row, FreeRows) for x, block in enumerate(row)]
    figure, axes = plt.subplots(figsize=(10, max(3.0, 8 * len(rows) / columns + 1.5)))
    axes.imshow(image, interpolation="nearest", aspect="equal")
    axes.set_xticks([])
    if len(drawn) <= PNG_ANNOTATE_MAX_BLOCKS:  # white lines between cells, so each block is countable
        axes.set_xticks([x - 0.5 for x in range(1, columns)], minor=True)
        axes.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
        axes.grid(which="minor", color="white", linewidth=0.8)
        axes.tick_params(which="minor", length=0)
    axes.set_yticks(range(len(rows)), [str(row.start if isinstance(row, FreeRows) else row[0]["id"]) for row in rows], fontsize=6)
    for y, row in enumerate(rows):
        if isinstance(row, FreeRows):
            axes.text(columns / 2 - 0.5, y, _free_rows_label(row), ha="center", va="center", fontsize=7, color="#555555")
    shared = [(y, x, block["ref"]) for y, x, block in drawn if block.get("ref", 0) > 1]
    if len(drawn) <= PNG_ANNOTATE_MAX_BLOCKS:
        for y, x, ref in shared:
            axes.text(x, y, str(ref), ha="center", va="center", fontsize=6)
    elif shared:
        axes.scatter([x for _, x, _ in shared], [y for y, _, _ in shared], s=4, c="black", marker="o")
    handles: list[Any] = [Patch(color=FREE_COLOR, label="free"), Patch(color=CACHED_COLOR, label="cached-free")]
    handles.append(Line2D([], [], color="black", marker="o" if len(drawn) > PNG_ANNOTATE_MAX_BLOCKS else "$2$",
                          linestyle="", label="shared (ref count > 1)"))  # fmt: skip
    handles += [Patch(color=color or "white", label=label) for label, color in legend_owners(blocks, colors)]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="held: request (blocks)", title_fontsize=7)
    f = memory["figures"]
    axes.set_title(
        f"worker {memory['worker']}: {f['held']} held ({f['shared']} shared), {f['cached']} cached-free, {f['free']} free "
        f"of {f['num_blocks']} blocks · utilization {f['utilization']:.1%} · internal frag. {f['internal_fragmentation']:.1%} · "
        f"external frag. {f['external_fragmentation']:.1%}",
        fontsize=8,
    )
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
