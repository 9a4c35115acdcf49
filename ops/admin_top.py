"""`pagedctl top`: a live view of a daemon, refreshed every --interval seconds: running and waiting,
generated tokens per second (from the daemon's token counter, which counts tokens as they are
produced, between two refreshes), KV use and prefix-cache hit rate per worker, whether the pool
thrashes (goodput, preemption and eviction rates over the daemon's window), and the longest-lived
requests. On a terminal it redraws in place; into a pipe it prints one plain snapshot per refresh."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import click
from rich.live import Live
from rich.text import Text

from paged.ops.admin_client import AdminClient, admin_command
from paged.ops.admin_output import Output, Part
from paged.ops.admin_tables import (
    pct,
    pressure_table,
    requests_table,
    service_state,
    store_lines,
    thrashing_workers,
    transfers_line,
    workers_table,
)

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


def _view(status: dict[str, Any], requests: list[dict[str, Any]], rate: float | None) -> list[Part]:
    workers = status["workers"]
    used = sum(w["used_blocks"] for w in workers)
    total = sum(w["num_blocks"] for w in workers)
    header = Text.assemble(
        (f"paged {status['served_model_name']}", "bold"),
        f" · {service_state(status)} · {'-' if rate is None else f'{rate:.1f}'} tokens/s",
        f" · running {status['running_seqs']} · waiting {status['waiting_requests']} · swapped {status['swapped_requests']}",
        f" · KV {used}/{total} blocks ({pct(used / total if total else 0.0)})",
    )
    thrashing = thrashing_workers(workers)
    if thrashing:
        header.append(f" · KV THRASHING on worker {', '.join(thrashing)}", style="bold red")
    shown = requests[:TOP_REQUESTS]
    parts: list[Part] = [header, workers_table(workers), pressure_table(workers)]
    transfers = transfers_line(status.get("transfers"))
    if transfers:
        parts.append(transfers)
    parts.extend(store_lines(status))
    parts.append(requests_table(shown) if shown else "no unfinished requests")
    if len(requests) > len(shown):
        parts.append(Text(f"{len(requests) - len(shown)} more requests", style="dim"))
    return parts


@click.command()
@admin_command
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.05), help="Seconds between refreshes.")
@click.option("--iterations", default=None, type=click.IntRange(min=1), help="Stop after N refreshes [default: until Ctrl-C].")
def top(client: AdminClient, as_json: bool, interval: float, iterations: int | None) -> None:
    """A live, refreshing view: running/waiting, tokens/s, KV use, hit rate, requests."""
    rate = TokenRate()
    output = Output()
    count = 0
    # A terminal redraws in place; --json prints one JSON line per refresh, a pipe one plain snapshot.
    redraw = output.terminal and not as_json
    with Live(console=output.console, auto_refresh=False) if redraw else contextlib.nullcontext() as live:
        try:
            while iterations is None or count < iterations:
                if count:
                    time.sleep(interval)
                status = client.get("/status")
                requests = client.get("/requests")
                tokens_per_s = rate.update(status["generation_tokens"], time.monotonic())
                count += 1
                if as_json:
                    click.echo(json.dumps({"status": status, "requests": requests, "tokens_per_s": tokens_per_s}))
                elif live is not None:
                    live.update(output.renderable(*_view(status, requests, tokens_per_s)), refresh=True)
                else:
                    output.print(*_view(status, requests, tokens_per_s), "")
        except KeyboardInterrupt:
            pass
