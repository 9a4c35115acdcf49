"""`pagedd`, the paged daemon's program: the gateway's commands (`serve`, `gateway`), the worker's
(`worker`, also installed alone as `paged-worker`) and the in-process engine (`generate`). It lives
in ops/ because it puts both sides together: the gateway and the worker never import each other.

`pagedd --config FILE` reads every command's options from one TOML file (shared/config_file.py).
"""

from __future__ import annotations

import click

from paged.gateway.cli import gateway, serve
from paged.ops.generate import generate
from paged.shared.cli_options import log_json_option, log_level_option
from paged.shared.config_file import check_config_option, config_file_option
from paged.shared.logging import configure_logging
from paged.worker.cli import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_file_option
@check_config_option
@log_level_option
@log_json_option
def main(log_level: str, log_json: bool | None) -> None:
    """paged: an LLM inference server built around PagedAttention."""
    configure_logging(log_level, json=log_json)


for command in (generate, serve, gateway, worker):
    main.add_command(command)


if __name__ == "__main__":
    main()
