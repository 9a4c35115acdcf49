"""pagedctl's admin commands: look inside a running daemon (status, memmap, requests, cache; `top`
is in ops/admin_top.py) and act on it (abort, drain, resume, flush-cache, log-level). All talk to the admin API through
ops/admin_client.py and take --json, --socket, --url and --token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from paged.ops.admin_client import AdminClient, admin_command
from paged.ops.admin_tables import pct, requests_table, workers_table
from paged.ops.memmap_render import render_memmap, write_png
from paged.shared.logging import LEVELS


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2))


@click.command()
@admin_command
def status(client: AdminClient, as_json: bool) -> None:
    """Version, model, uptime, workers, queues and policy."""
    payload = client.get("/status")
    if as_json:
        return _print_json(payload)
    console = Console()
    state = "draining" if payload["draining"] else "ready" if payload["ready"] else "not ready"
    console.print(f"[bold]paged {payload['version']}[/] · {payload['served_model_name']} ({payload['model']}) · {state} · up {payload['uptime_s']:.0f}s")
    console.print(
        f"running {payload['running_seqs']} sequences · waiting {payload['waiting_requests']} · swapped {payload['swapped_requests']} requests"
    )
    console.print(workers_table(payload["workers"]))
    policy = {**payload["policy"]["scheduler"], **payload["policy"]["cache"]}
    console.print("policy: " + ", ".join(f"{key}={value}" for key, value in policy.items()))


@click.command()
@admin_command
@click.option("--worker", default="0", show_default=True, help="Which worker's pool.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the map as a PNG picture.")
def memmap(client: AdminClient, as_json: bool, worker: str, png_path: Path | None) -> None:
    """Every KV block of a worker: free, cached-free or held (by whom), with utilization and fragmentation."""
    memory = client.get(f"/workers/{worker}/memmap")
    if png_path is not None:
        write_png(memory, png_path)
    if as_json:
        return _print_json(memory)
    console = Console()
    console.print(render_memmap(memory, console.width))
    if png_path is not None:
        console.print(f"wrote {png_path}")


@click.command()
@admin_command
def requests(client: AdminClient, as_json: bool) -> None:
    """Unfinished requests, longest-lived first."""
    payload = client.get("/requests")
    if as_json:
        return _print_json(payload)
    Console().print(requests_table(payload) if payload else "no unfinished requests")


@click.command()
@admin_command
@click.argument("request_id")
def request(client: AdminClient, as_json: bool, request_id: str) -> None:
    """One request, with each sequence's block table."""
    payload = client.get(f"/requests/{request_id}")
    if as_json:
        return _print_json(payload)
    console = Console()
    console.print(requests_table([payload]))
    for seq in payload["seqs"]:
        where = "host blocks" if seq["swapped"] else "blocks"
        console.print(f"seq {seq['index']} ({seq['status']}, {seq['computed']}/{seq['tokens']} tokens computed) {where}: {seq['block_table']}")


@click.command()
@admin_command
def cache(client: AdminClient, as_json: bool) -> None:
    """The prefix cache per worker: cached blocks, hit rate, evictions, hottest shared prefixes."""
    payload = client.get("/cache")
    if as_json:
        return _print_json(payload)
    console = Console()
    for summary in payload:
        enabled = "" if summary["enabled"] else " (prefix caching off)"
        console.print(
            f"[bold]worker {summary['worker']}[/]{enabled}: {summary['cached_free_blocks']} cached-free, "
            f"{summary['cached_held_blocks']} cached and held blocks · hit rate {pct(summary['hit_rate'])} "
            f"({summary['hits_tokens']}/{summary['queries_tokens']} tokens) · {summary['evictions']} evictions"
        )
        if summary["hottest_prefixes"]:
            table = Table("blocks", "holders", "blocks × holders", "first block", "hash")
            for prefix in summary["hottest_prefixes"]:
                table.add_row(
                    str(prefix["blocks"]), ", ".join(prefix["holders"]), str(prefix["score"]), str(prefix["first_block"]), prefix["hash"] or "-"
                )
            console.print(table)


def _act(client: AdminClient, as_json: bool, path: str, message: str, body: Any = None) -> None:
    payload = client.post(path, body)
    if as_json:
        _print_json(payload)
    else:
        click.echo(message.format(**payload))


@click.command()
@admin_command
@click.argument("request_id")
def abort(client: AdminClient, as_json: bool, request_id: str) -> None:
    """End a request now and free its blocks (its client sees the stream end)."""
    _act(client, as_json, f"/requests/{request_id}/abort", "aborted {aborted}")


@click.command()
@admin_command
def drain(client: AdminClient, as_json: bool) -> None:
    """Stop admitting requests (503, /health says draining); running ones finish."""
    _act(client, as_json, "/drain", "draining: new requests get 503 until `pagedctl resume`")


@click.command()
@admin_command
def resume(client: AdminClient, as_json: bool) -> None:
    """Admit requests again after drain."""
    _act(client, as_json, "/resume", "resumed: admitting requests")


@click.command("flush-cache")
@admin_command
def flush_cache(client: AdminClient, as_json: bool) -> None:
    """Forget every cached-free block; blocks held by requests keep their content."""
    _act(client, as_json, "/flush-cache", "flushed {flushed_blocks} cached-free blocks")


@click.command("log-level")
@admin_command
@click.argument("level", type=click.Choice(LEVELS, case_sensitive=False))
def log_level(client: AdminClient, as_json: bool, level: str) -> None:
    """Change the gateway's log level while it runs."""
    _act(client, as_json, "/log-level", "log level {level}", {"level": level.lower()})

