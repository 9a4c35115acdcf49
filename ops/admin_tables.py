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


def pressure_table(workers: list[dict[str, Any]]) -> Columns:
    """Is the pool thrashing: per worker, over the thrash detector's sliding window, the share of
    computed tokens computed for the first time (goodput), preemptions and cached-block evictions
    per second, the share of evicted blocks needed again (refetch), the prefix-cache hit rate; the
    recomputed-token total and the admission margin."""
    table = Columns(["worker", "thrashing", "goodput", "recomputed", "preempt/s", "evict/s", "refetch", "hits", "window", "margin"])
    for w in workers:
        table.rows.append([
            w["name"], "YES" if w.get("kv_thrashing") else "no", pct(w.get("goodput", 1.0)), str(w.get("recomputed_tokens", 0)),
            f"{w.get('preemptions_per_s', 0.0):.2f}", f"{w.get('evictions_per_s', 0.0):.1f}", pct(w.get("refetch_share", 0.0)),
            pct(w.get("window_prefix_hit_rate", 0.0)), f"{w.get('window_s', 0.0):.0f}s", f"{w.get('admission_margin', 0.0):.2f}",
        ])  # fmt: skip
    return table


def thrashing_workers(workers: list[dict[str, Any]]) -> list[str]:
    return [w["name"] for w in workers if w.get("kv_thrashing")]


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
