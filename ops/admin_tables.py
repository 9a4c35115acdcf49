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


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count}B"


def _mean_ms(histogram: dict[str, Any]) -> str:
    return f"{1000 * histogram['sum'] / histogram['count']:.3f}" if histogram["count"] else "-"


def pool_tier_table(summaries: list[dict[str, Any]]) -> Columns:
    """The prefix cache's first tier, one row per worker: its page pool. `hits` are prompt tokens
    served by either tier, split into pool and store; `missed` were in neither (with a store)."""
    table = Columns(["worker", "policy", "cached-free", "cached-held", "hit rate", "pool hits", "store hits", "missed", "evictions"])
    for c in summaries:
        table.rows.append([
            c["worker"], c["eviction_policy"] or "-", str(c["cached_free_blocks"]), str(c["cached_held_blocks"]),
            pct(c["hit_rate"]), str(c["hits_tokens"] - c["store_hits_tokens"]), str(c["store_hits_tokens"]),
            str(c["store_misses_tokens"]), str(c["evictions"]),
        ])  # fmt: skip
    return table


def store_tier_table(summaries: list[dict[str, Any]]) -> Columns | None:
    """The second tier, one row per host KV store (workers sharing one are listed together); None without one."""
    stores: dict[str, dict[str, Any]] = {}
    workers: dict[str, list[str]] = {}
    for c in summaries:
        if c["store"] is not None:
            stores[c["store"]["store_id"]] = c["store"]
            workers.setdefault(c["store"]["store_id"], []).append(c["worker"])
    if not stores:
        return None
    table = Columns([
        "store", "workers", "policy", "slots", "ready", "pinned", "saving", "quarantined", "free", "used",
        "saves", "loads", "evictions", "dropped", "save ms", "load ms",
    ])  # fmt: skip
    for store_id, s in stores.items():
        table.rows.append([
            store_id[:12], ",".join(workers[store_id]), s["policy"], str(s["num_slots"]), str(s["ready_slots"]),
            str(s["pinned_slots"]), str(s["saving_slots"]), str(s["quarantined_slots"]), str(s["free_slots"]),
            _bytes(s["bytes_used"]), str(s["saves"]), str(s["loads"]), str(s["evictions"]), str(s["dropped_saves"]),
            _mean_ms(s["save_seconds"]), _mean_ms(s["load_seconds"]),
        ])  # fmt: skip
    return table
