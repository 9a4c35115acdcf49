"""`pagedctl`: operate and measure paged servers. Each command lives in its own module and is registered here."""

from __future__ import annotations

import click

from paged.ops.admin_commands import ADMIN_COMMANDS
from paged.ops.bench.command import bench


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """paged's operator tool."""


main.add_command(bench)
for command in ADMIN_COMMANDS:
    main.add_command(command)
