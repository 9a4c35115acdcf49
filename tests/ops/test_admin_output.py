"""pagedctl's layout: tables that fit the terminal's width or turn into one block per row, never cut
values (`wor… sta…`), and plain text without colour or box drawing when the output is not a terminal."""

from __future__ import annotations

import io
import pytest
from click.testing import CliRunner
from rich.console import Console

from paged.ops.admin_output import Output
from paged.ops.admin_tables import requests_table, store_tier_table, workers_table
from paged.ops.admin_top import _view

WORKER = {
    "name": "0", "state": "ready", "running_seqs": 37, "waiting_requests": 1204, "used_blocks": 123456, "num_blocks": 131072,
    "cached_blocks": 5120, "free_blocks": 2496, "kv_utilization": 0.9312, "prefix_hit_rate": 0.4471, "preemptions": 18,
    "steps": 9876543,
}  # fmt: skip
REQUEST = {
    "id": "cmpl-6f2b8d0c4a1e4f9b8c7d6e5f4a3b2c1d-12", "worker": "0", "state": "running", "priority": 0, "prompt_tokens": 1500,
    "generated_tokens": 230, "cached_tokens": 1024, "waiting_s": 0.01, "running_s": 12.5, "preemptions": 0,
    "seqs": [{"block_table": list(range(109))}],
}  # fmt: skip
STATUS = {
    "served_model_name": "stories260K", "draining": False, "ready": True, "running_seqs": 37, "waiting_requests": 1204,
    "swapped_requests": 0, "workers": [WORKER, {**WORKER, "name": "1"}],
}  # fmt: skip
BOX_DRAWING = set("─━│┃┏┓┗┛╭╮╰╯")


def terminal(width: int) -> tuple[Output, io.StringIO]:
    buffer = io.StringIO()
    return Output(Console(file=buffer, force_terminal=True, width=width, color_system=None)), buffer


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_a_terminal_gets_whole_values_within_its_width(width: int) -> None:
    output, buffer = terminal(width)
    output.print(*_view(STATUS, [REQUEST] * 3, 1234.5))
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = buffer.getvalue()
    assert "…" not in text
    for value in ("123456/131072", "9876543", "93.1%", "44.7%", REQUEST["id"], "1234.5 tokens/s", "12.50"):
        assert value in text, (value, text)


def test_a_wide_terminal_gets_tables_and_a_narrow_one_blocks_per_row() -> None:
    wide, wide_buffer = terminal(200)
    wide.print(workers_table([WORKER]))
    assert [line for line in wide_buffer.getvalue().splitlines() if line.strip()][0].split() == workers_table([]).headers[:4] + ["KV", "used"] + workers_table([]).headers[5:]
    narrow, narrow_buffer = terminal(80)
    narrow.print(requests_table([REQUEST]))
    lines = narrow_buffer.getvalue().splitlines()
    assert lines[0] == f"request {REQUEST['id']}" and "prompt 1500" in narrow_buffer.getvalue() and "blocks 109" in narrow_buffer.getvalue()


def test_a_pipe_gets_plain_aligned_columns() -> None:
    output = Output(Console(file=io.StringIO(), force_terminal=False))
    assert not output.terminal
    runner = CliRunner()
    with runner.isolation() as (out, _, _):
        output.print(*_view(STATUS, [REQUEST], None))
    text = out.getvalue().decode()
    assert not BOX_DRAWING & set(text) and "\x1b[" not in text and "…" not in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("worker"))
    row = lines[lines.index(header) + 1]
    assert header.split()[:3] == ["worker", "state", "run"] and row.split()[:4] == ["0", "ready", "37", "1204"]
    assert row.index("ready") == header.index("state")  # aligned under its header
    assert any(line.startswith(REQUEST["id"] + "  ") for line in lines)



TRANSFERS = {
    "in_flight": 2, "started": 120, "completed": 115, "cancelled": 2, "failures": {"decode_lost": 1}, "blocks": 9000,
    "bytes": 9000 * 16384, "blocks_skipped": 310,
    "latency": {"bounds": [0.01, 0.1], "counts": [100, 15, 0], "sum": 0.92, "count": 115},
}  # fmt: skip


@pytest.mark.parametrize("width", [60, 100, 200])
def test_roles_and_kv_transfers_show_whole_within_the_width(width: int) -> None:
    status = {**STATUS, "transfers": TRANSFERS,
              "workers": [{**WORKER, "role": "prefill", "kv_transfers_in_flight": 2}, {**WORKER, "name": "1", "role": "decode"}]}  # fmt: skip
    output, buffer = terminal(width)
    output.print(*_view(status, [REQUEST], None))
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = " ".join(buffer.getvalue().split())
    for value in ("prefill", "decode", "2 in flight", "115 done", "1 failed (decode_lost 1)", "9000 blocks", "140.6 MiB", "mean 8.0 ms"):
        assert value in text, (value, text)


def test_without_prefill_or_decode_workers_status_looks_as_before() -> None:
    assert workers_table([WORKER]).headers[:2] == ["worker", "state"] and "xfer" not in workers_table([WORKER]).headers
    assert workers_table([{**WORKER, "role": "decode"}]).headers[:3] == ["worker", "role", "state"]
    output, buffer = terminal(200)
    output.print(*_view({**STATUS, "transfers": {**TRANSFERS, "started": 0, "in_flight": 0}}, [], None))
    assert "KV transfers" not in buffer.getvalue()


def test_top_shows_a_thrashing_pool_and_its_rates_within_the_width() -> None:
    thrashing = {**WORKER, "name": "1", "kv_thrashing": True, "goodput": 0.62, "recomputed_tokens": 91234, "block_waits": 4077,
                 "preemptions_per_s": 3.25, "evictions_per_s": 120.5, "window_prefix_hit_rate": 0.12, "window_s": 10.0,
                 "admission_margin": 2.5}  # fmt: skip
    status = {**STATUS, "workers": [WORKER, thrashing]}
    for width in (60, 200):
        output, buffer = terminal(width)
        output.print(*_view(status, [REQUEST], None))
        text = buffer.getvalue()
        assert all(len(line) <= width for line in text.splitlines()), text
        assert "KV THRASHING on worker 1" in text
        for value in ("62.0%", "91234", "4077", "3.25", "120.5", "12.0%", "2.50", "YES"):
            assert value in text, (value, text)
    output, buffer = terminal(200)
    output.print(*_view(STATUS, [REQUEST], None))
    assert "THRASHING" not in buffer.getvalue() and "goodput" in buffer.getvalue()


STORE = {
    "store_id": "9c1b3f2a77e04d5e", "policy": "lfu", "num_slots": 4096, "page_bytes": 16384, "free_slots": 1000,
    "saving_slots": 0, "ready_slots": 3090, "pinned_slots": 6, "quarantined_slots": 0, "saves": 5000, "loads": 812,
    "evictions": 904, "dropped_saves": 0, "failed_saves": 3, "failed_loads": 1, "bytes_used": 3096 * 16384,
    "save_seconds": {"sum": 0.5, "count": 100}, "load_seconds": {"sum": 0.0, "count": 0},
}  # fmt: skip


def test_the_store_tier_table_counts_saves_and_loads_that_ran_and_failed() -> None:
    table = store_tier_table([{"worker": "0", "store": STORE}, {"worker": "1", "store": STORE}])
    assert table is not None
    (row,) = (dict(zip(table.headers, row, strict=True)) for row in table.rows)
    assert (row["workers"], row["saves"], row["loads"], row["failed saves"], row["failed loads"]) == ("0,1", "5000", "812", "3", "1")
    assert (row["save ms"], row["load ms"]) == ("5.000", "-")


@pytest.mark.parametrize("width", [60, 200])
def test_status_and_top_show_the_kv_store_tier_within_the_width(width: int) -> None:
    workers = [{**WORKER, "prefix_queries_tokens": 10000, "store_hits_tokens": 2500}, {**WORKER, "name": "1"}]
    status = {**STATUS, "workers": workers, "stores": [STORE]}
    output, buffer = terminal(width)
    output.print(*_view(status, [REQUEST], None))
    assert all(len(line) <= width for line in buffer.getvalue().splitlines()), buffer.getvalue()
    text = " ".join(buffer.getvalue().split())
    for value in ("KV store 9c1b3f2a77e0 (lfu)", "3090/4096 slots ready", "48.4MiB of 64.0MiB", "812 loads", "904 evictions",
                  "prompt tokens loaded from the KV store: 25.0%"):  # fmt: skip
        assert value in text, (value, text)
    output, buffer = terminal(width)
    output.print(*_view({**STATUS, "stores": []}, [REQUEST], None))
    assert "KV store" not in buffer.getvalue()
