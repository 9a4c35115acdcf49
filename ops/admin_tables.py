"""The tables pagedctl shares between its one-shot commands and the live `top` view, as Columns
(ops/admin_output.py lays them out for a terminal or a pipe)."""

from __future__ import annotations

from typing import Any

from paged.ops.admin_output import Columns


def pct(value: float) -> str:
    return f"{value:.1%}"


def workers_table(workers: list[dict[str, Any]]) -> Columns:
    table = Columns(["worker", "state", "run", "wait", "KV used", "cached", "free", "slots", "hits", "preempt", "steps"])
    for w in workers:
        table.rows.append([
            w["name"], w["state"], str(w["running_seqs"]), str(w["waiting_requests"]),
            f"{w['used_blocks']}/{w['num_blocks']}", str(w["cached_blocks"]), str(w["free_blocks"]),
            pct(w["kv_utilization"]), pct(w["prefix_hit_rate"]), str(w["preemptions"]), str(w["steps"]),
        ])  # fmt: skip
    return table


def requests_table(requests: list[dict[str, Any]]) -> Columns:
    """One row per request; `blocks` lists each sequence's block-table length; `gen` counts
    generated tokens; `slots` (workers) is the share of reserved token slots holding tokens.
    The request id comes first: it is what the other commands take, so it is never cut."""
    table = Columns(["request", "worker", "state", "prio", "prompt", "gen", "cached", "blocks", "wait s", "run s", "preempt"])
    for r in requests:
        blocks = " ".join(str(len(seq["block_table"])) for seq in r["seqs"])
        table.rows.append([
            r["id"], r["worker"], r["state"], str(r["priority"]), str(r["prompt_tokens"]), str(r["generated_tokens"]),
            str(r["cached_tokens"]), blocks or "0", f"{r['waiting_s']:.2f}", f"{r['running_s']:.2f}", str(r["preemptions"]),
        ])  # fmt: skip
    return table
