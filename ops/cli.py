"""`pagedctl`: operate and measure paged servers. Each command lives in its own module and is
imported only when it runs: `pagedctl status` must not pay for `bench`'s numpy, matplotlib and
load generator (an admin command answers in well under 0.3 s of CPU)."""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of its click command
COMMANDS = {
    "bench": "paged.ops.bench.command:bench",
    "status": "paged.ops.admin_commands:status",
    "memmap": "paged.ops.admin_commands:memmap",
    "requests": "paged.ops.admin_commands:requests",
    "request": "paged.ops.admin_commands:request",
    "cache": "paged.ops.admin_commands:cache",
    "top": "paged.ops.admin_top:top",
    "abort": "paged.ops.admin_commands:abort",
    "drain": "paged.ops.admin_commands:drain",
    "resume": "paged.ops.admin_commands:resume",
    "flush-cache": "paged.ops.admin_commands:flush_cache",
    "log-level": "paged.ops.admin_commands:log_level",
}


class LazyGroup(click.Group):
    """A group whose commands are imported by name when invoked (or listed by --help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """paged's operator tool."""
