"""pagedctl's admin commands: look inside a running daemon (status, memmap, requests, cache; `top`
is in ops/admin_top.py) and act on it (abort, drain, resume, flush-cache, log-level). All talk to the admin API through
ops/admin_client.py and take --json, --socket, --url and --token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from paged.ops.admin_client import AdminClient, admin_command
from paged.ops.admin_output import Columns, Output, Part
from paged.ops.admin_tables import (
    pool_tier_table,
    pressure_table,
    requests_table,
    service_state,
    store_lines,
    store_tier_table,
    thrashing_workers,
    transfers_line,
    workers_table,
)
from paged.ops.memmap_render import render_memmap, write_png
from paged.shared.logging import LEVELS


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2))


@click.command()
@admin_command
def status(client: AdminClient, as_json: bool) -> None:
    """Version, model, uptime, workers (and their roles), queues, KV transfers and policy."""
    payload = client.get("/status")
    if as_json:
        return _print_json(payload)
    policy = {**payload["policy"]["scheduler"], **payload["policy"]["cache"]}
    transfers = transfers_line(payload.get("transfers"))
    thrashing = thrashing_workers(payload["workers"])
    Output().print(
        Text.assemble((f"paged {payload['version']}", "bold"), f" · {payload['served_model_name']} ({payload['model']})"
                      f" · {service_state(payload)} · up {payload['uptime_s']:.0f}s"),
        f"running {payload['running_seqs']} sequences · waiting {payload['waiting_requests']} · swapped {payload['swapped_requests']} requests",
        workers_table(payload["workers"]),
        *([transfers] if transfers else []),
        *store_lines(payload),
        Text(f"KV thrashing on worker {', '.join(thrashing)}" + (
            ": predictive admission is tightened until it clears" if policy.get("admission_policy") == "predictive" else ""
        ), style="bold red") if thrashing else "KV pool not thrashing",
        pressure_table(payload["workers"]),
        "policy: " + ", ".join(f"{key}={value}" for key, value in policy.items()),
    )  # fmt: skip


@click.command()
@admin_command
@click.option("--worker", default="0", show_default=True, help="Which worker's pool.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the map as a PNG picture.")
@click.option("--all", "show_all", is_flag=True, help="Draw every row of blocks; by default runs of wholly free rows are one line each.")
def memmap(client: AdminClient, as_json: bool, worker: str, png_path: Path | None, show_all: bool) -> None:
    """The KV blocks of a worker: free, cached-free or held (by whom), with utilization and fragmentation."""
    memory = client.get(f"/workers/{worker}/memmap")
    if png_path is not None:
        write_png(memory, png_path, collapse=not show_all)
    if as_json:
        return _print_json(memory)
    console = Console()
    console.print(render_memmap(memory, console.width, collapse=not show_all))
    if png_path is not None:
        console.print(f"wrote {png_path}")


@click.command()
@admin_command
def requests(client: AdminClient, as_json: bool) -> None:
    """Unfinished requests, longest-lived first."""
    payload = client.get("/requests")
    if as_json:
        return _print_json(payload)
    Output().print(requests_table(payload) if payload else "no unfinished requests")


@click.command()
@admin_command
@click.argument("request_id")
def request(client: AdminClient, as_json: bool, request_id: str) -> None:
    """One request, with each sequence's block table."""
    payload = client.get(f"/requests/{request_id}")
    if as_json:
        return _print_json(payload)
    lines = [
        f"seq {seq['index']} ({seq['status']}, {seq['tokens']} tokens, {seq['computed']} computed or in flight) "
        f"{'host blocks' if seq['swapped'] else 'blocks'}: {seq['block_table']}"
        for seq in payload["seqs"]
    ]
    Output().print(requests_table([payload]), *lines)


@click.command()
@admin_command
def cache(client: AdminClient, as_json: bool) -> None:
    """Both tiers of the prefix cache: each worker's pool (cached blocks, hits, evictions), the host
    KV stores (slots, saves, loads, latency), and each worker's hottest shared prefixes."""
    payload = client.get("/cache")
    if as_json:
        return _print_json(payload)
    parts: list[Part] = [Text("pool tier", "bold"), pool_tier_table(payload)]
    stores = store_tier_table(payload)
    parts += [Text("host KV store tier", "bold"), stores] if stores is not None else ["host KV store tier: none (--kv-offload-memory 0)"]
    for summary in payload:
        if not summary["enabled"]:
            parts.append(f"worker {summary['worker']}: prefix caching off")
        elif summary["hottest_prefixes"]:
            parts.append(Text(f"worker {summary['worker']}: hottest shared prefixes", "bold"))
            table = Columns(["blocks", "holders", "blocks × holders", "first block", "hash"])
            for prefix in summary["hottest_prefixes"]:
                table.rows.append([
                    str(prefix["blocks"]), ", ".join(prefix["holders"]), str(prefix["score"]), str(prefix["first_block"]), prefix["hash"] or "-"
                ])  # fmt: skip
            parts.append(table)
    Output().print(*parts)


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
    """Forget every cached-free block and KV store entry; blocks held by requests keep their content."""
    _act(client, as_json, "/flush-cache", "flushed {flushed_blocks} cached-free blocks and {flushed_store_entries} KV store entries")


@click.command("log-level")
@admin_command
@click.argument("level", type=click.Choice(LEVELS, case_sensitive=False))
def log_level(client: AdminClient, as_json: bool, level: str) -> None:
    """Change the gateway's log level while it runs."""
    _act(client, as_json, "/log-level", "log level {level}", {"level": level.lower()})

