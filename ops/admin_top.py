"""`pagedctl top`: a live view of a daemon, refreshed every --interval seconds: running and waiting,
generated tokens per second (from the daemon's token counter between two refreshes), KV use and
prefix-cache hit rate per worker, and the longest-lived requests."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from paged.ops.admin_client import AdminClient, admin_command
from paged.ops.admin_tables import pct, requests_table, workers_table

TOP_REQUESTS = 20


class TokenRate:
    """Tokens per second between successive readings of a monotonic token counter."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def update(self, tokens: float | None, now: float) -> float | None:
        if tokens is None:
            return None
        last, self._last = self._last, (now, tokens)
        if last is None or now <= last[0]:
            return None
        return (tokens - last[1]) / (now - last[0])


def _view(status: dict[str, Any], requests: list[dict[str, Any]], rate: float | None) -> RenderableType:
    workers = status["workers"]
    used = sum(w["used_blocks"] for w in workers)
    total = sum(w["num_blocks"] for w in workers)
    state = "draining" if status["draining"] else "ready" if status["ready"] else "not ready"
    header = Text.assemble(
        (f"paged {status['served_model_name']}", "bold"),
        f" · {state} · running {status['running_seqs']} · waiting {status['waiting_requests']}",
        f" · swapped {status['swapped_requests']} · KV {used}/{total} blocks ({pct(used / total if total else 0.0)})",
        f" · {'-' if rate is None else f'{rate:.1f}'} tokens/s",
    )
    shown = requests[:TOP_REQUESTS]
    footer = Text(f"{len(requests) - len(shown)} more requests", style="dim") if len(requests) > len(shown) else Text("")
    return Group(header, workers_table(workers), requests_table(shown), footer)


@click.command()
@admin_command
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.05), help="Seconds between refreshes.")
@click.option("--iterations", default=None, type=click.IntRange(min=1), help="Stop after N refreshes [default: until Ctrl-C].")
def top(client: AdminClient, as_json: bool, interval: float, iterations: int | None) -> None:
    """A live, refreshing view: running/waiting, tokens/s, KV use, hit rate, requests."""
    rate = TokenRate()
    console = Console()
    count = 0
    # Under --json: no screen, one JSON line per refresh.
    with contextlib.nullcontext() if as_json else Live(console=console, auto_refresh=False) as live:
        try:
            while iterations is None or count < iterations:
                if count:
                    time.sleep(interval)
                status = client.get("/status")
                requests = client.get("/requests")
                tokens_per_s = rate.update(status["generation_tokens"], time.monotonic())
                count += 1
                if live is None:
                    click.echo(json.dumps({"status": status, "requests": requests, "tokens_per_s": tokens_per_s}))
                else:
                    live.update(_view(status, requests, tokens_per_s), refresh=True)
        except KeyboardInterrupt:
            pass

