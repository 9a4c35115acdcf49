"""How pagedctl prints: on a terminal, with rich (colour, tables fitted to the terminal's width, and a
block of `name value` pairs per row where a table cannot fit, rather than columns cut to `wor… sta…`);
into a pipe or a file, as plain text (no colour, no box drawing), every column at its natural width,
so `grep` and `awk` see whole values.

Commands describe their output as Parts: a line of text, or a Columns table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

COLUMN_GAP = "  "
PAIR_SEPARATOR = " · "
RECORD_INDENT = "  "
UNBOUNDED_WIDTH = 1 << 20  # measuring a table's natural width, not the width it would be squeezed into


@dataclass
class Columns:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)


Part = str | Text | Columns


class Output:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.terminal = self.console.is_terminal

    def print(self, *parts: Part) -> None:
        if self.terminal:
            self.console.print(self.renderable(*parts))
        else:
            click.echo("\n".join(plain_lines(*parts)))

    def renderable(self, *parts: Part) -> RenderableType:
        """The parts for a terminal of the console's width (also what `top` redraws)."""
        return Group(*(self._fitted(part) if isinstance(part, Columns) else Text(part) if isinstance(part, str) else part for part in parts))

    def _fitted(self, columns: Columns) -> RenderableType:
        table = Table(*columns.headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for row in columns.rows:
            table.add_row(*row)
        natural = Measurement.get(self.console, self.console.options.update_width(UNBOUNDED_WIDTH), table).maximum
        if natural <= self.console.width:
            return table
        return Group(*(_record(columns.headers, row, self.console.width) for row in columns.rows))


def _record(headers: list[str], row: list[str], width: int) -> Text:
    """One row that no table of this width could show whole: its first column as a title, then the
    others as `name value` pairs, packed into indented lines of at most `width` characters."""
    text = Text(f"{headers[0]} {row[0]}", style="bold")
    line = ""
    for pair in (f"{name} {value}" for name, value in zip(headers[1:], row[1:], strict=True)):
        candidate = f"{line}{PAIR_SEPARATOR}{pair}" if line else f"{RECORD_INDENT}{pair}"
        if line and len(candidate) > width:
            text.append("\n" + line)
            candidate = RECORD_INDENT + pair
        line = candidate
    return text.append("\n" + line) if line else text


def plain_lines(*parts: Part) -> list[str]:
    lines: list[str] = []
    for part in parts:
        if isinstance(part, Columns):
            lines.extend(_aligned(part))
        else:
            lines.extend(str(part.plain if isinstance(part, Text) else part).splitlines() or [""])
    return lines


def _aligned(columns: Columns) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(columns.headers, *columns.rows, strict=True)]
    return [
        COLUMN_GAP.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (columns.headers, *columns.rows)
    ]
