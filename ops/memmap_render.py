"""Drawing a worker's memory map (the admin API's /workers/N/memmap JSON): in the terminal with rich,
one two-character cell per block, or as a PNG with matplotlib for reports. Both use the same
colors: grey free, light blue cached-free, one color per holding request (shared blocks show their
ref count on the first holder's color)."""

from __future__ import annotations

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
PNG_ANNOTATE_MAX_BLOCKS = 1024  # above this, ref-count digits would be unreadable in the picture


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


def render_memmap(memory: dict[str, Any], width: int) -> RenderableType:
    blocks = memory["blocks"]
    colors = owner_colors(blocks)
    per_row = max(8, (width - ROW_LABEL_WIDTH) // CELL_WIDTH)
    grid = Text()
    for start in range(0, len(blocks), per_row):
        grid.append(f"{start:>{ROW_LABEL_WIDTH - 1}} ", style="dim")
        for block in blocks[start : start + per_row]:
            grid.append_text(_cell(block, colors))
        grid.append("\n")
    legend = Text()
    legend.append("··", style=FREE_COLOR).append(" free  ")
    legend.append("░░", style=CACHED_COLOR).append(" cached-free  ")
    legend.append("██", style=OWNER_COLORS[0]).append(" held (color: request)  ")
    legend.append(" 2", style=f"bold black on {OWNER_COLORS[0]}").append(" shared (ref count)")
    owners = Text()
    held = _blocks_per_owner(blocks)
    for owner, color in list(colors.items())[:LEGEND_OWNERS]:
        owners.append("██", style=color).append(f" {owner} ({held[owner]})  ")
    if len(colors) > LEGEND_OWNERS:
        owners.append(f"… {len(colors) - LEGEND_OWNERS} more requests")
    title = Text(f"worker {memory['worker']} · {memory['allocator']} allocator", style="bold")
    parts: list[RenderableType] = [title, grid, legend]
    if colors:
        parts.append(owners)
    parts.append(figures_text(memory["figures"]))
    return Group(*parts)


def _blocks_per_owner(blocks: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for block in blocks:
        for holder in set(block.get("holders", ())):
            counts[holder] = counts.get(holder, 0) + 1
    return counts


def write_png(memory: dict[str, Any], path: Path) -> None:
    """The same map as a picture: a square-ish grid of blocks, the legend and the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    blocks = memory["blocks"]
    colors = owner_colors(blocks)
    num = len(blocks)
    columns = max(1, min(64, int((num * 2) ** 0.5)))
    rows = -(-num // columns)
    image = [[(1.0, 1.0, 1.0)] * columns for _ in range(rows)]
    for block in blocks:
        image[block["id"] // columns][block["id"] % columns] = to_rgb(block_color(block, colors))
    figure, axes = plt.subplots(figsize=(10, max(3.0, 8 * rows / columns + 1.5)))
    axes.imshow(image, interpolation="nearest", aspect="equal")
    axes.set_xticks([])
    if num <= PNG_ANNOTATE_MAX_BLOCKS:  # white lines between cells, so each block is countable
        axes.set_xticks([x - 0.5 for x in range(1, columns)], minor=True)
        axes.set_yticks([y - 0.5 for y in range(1, rows)], minor=True)
        axes.grid(which="minor", color="white", linewidth=0.8)
        axes.tick_params(which="minor", length=0)
    axes.set_yticks(range(rows), [str(row * columns) for row in range(rows)], fontsize=6)
    if num <= PNG_ANNOTATE_MAX_BLOCKS:
        for block in blocks:
            if block.get("ref", 0) > 1:
                axes.text(block["id"] % columns, block["id"] // columns, str(block["ref"]), ha="center", va="center", fontsize=6)
    handles = [Patch(color=FREE_COLOR, label="free"), Patch(color=CACHED_COLOR, label="cached-free")]
    handles += [Patch(color=color, label=owner) for owner, color in list(colors.items())[:LEGEND_OWNERS]]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="number: ref count", title_fontsize=7)
    f = memory["figures"]
    axes.set_title(
        f"worker {memory['worker']}: {f['held']} held, {f['cached']} cached-free, {f['free']} free of {f['num_blocks']} blocks · "
        f"utilization {f['utilization']:.1%} · internal frag. {f['internal_fragmentation']:.1%} · "
        f"external frag. {f['external_fragmentation']:.1%}",
        fontsize=8,
    )
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
