"""The tables pagedctl shares between its one-shot commands and the live `top` view, as Columns
(ops/admin_output.py lays them out for a terminal or a pipe)."""

from __future__ import annotations

from typing import Any

from paged.ops.admin_output import Columns


def pct(value: float) -> str:
    return f"{value:.1%}"


def service_state(status: dict[str, Any]) -> str:
    """What the daemon does with new requests: draining, ready or not ready."""
    return "draining" if status["draining"] else "ready" if status["ready"] else "not ready"


def workers_table(workers: list[dict[str, Any]]) -> Columns:
    """One row per worker; with prefill or decode workers, a `role` column after the name and the
    KV transfers each one sends or receives now (`xfer`)."""
    roles = [w.get("role", "mixed") for w in workers]
    disaggregated = any(role != "mixed" for role in roles)
    headers = ["worker", "state", "run", "wait", "KV used", "cached", "free", "slots", "hits", "preempt", "steps"]
    table = Columns(["worker", "role", *headers[1:], "xfer"] if disaggregated else headers)
    for w, role in zip(workers, roles, strict=True):
        row = [
            w["name"], w["state"], str(w["running_seqs"]), str(w["waiting_requests"]),
            f"{w['used_blocks']}/{w['num_blocks']}", str(w["cached_blocks"]), str(w["free_blocks"]),
            pct(w["kv_utilization"]), pct(w["prefix_hit_rate"]), str(w["preemptions"]), str(w["steps"]),
        ]  # fmt: skip
        table.rows.append([row[0], role, *row[1:], str(w.get("kv_transfers_in_flight", 0))] if disaggregated else row)
    return table


def transfers_line(transfers: dict[str, Any] | None) -> str | None:
    """The KV hand-offs in one line (None when there were none and none are in flight)."""
    if not transfers or not (transfers["started"] or transfers["in_flight"]):
        return None
    failed = sum(transfers["failures"].values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(transfers["failures"].items()))
    completed = transfers["completed"]
    mean_ms = transfers["latency"]["sum"] / completed * 1e3 if completed else None
    return (
        f"KV transfers: {transfers['in_flight']} in flight · {completed} done · {transfers['cancelled']} cancelled"
        f" · {failed} failed{f' ({reasons})' if reasons else ''} · {transfers['blocks']} blocks"
        f" ({transfers['bytes'] / 2**20:.1f} MiB, {transfers['blocks_skipped']} cached on the decode side)"
        + (f" · mean {mean_ms:.1f} ms" if mean_ms is not None else "")
    )


def store_lines(status: dict[str, Any]) -> list[str]:
    """The host KV stores (docs/kv-store.md), a line each, then the share of all prompt tokens loaded from
    them; [] without one."""
    stores = status.get("stores") or []
    if not stores:
        return []
    lines = [
        f"KV store {store['store_id'][:12]} ({store['policy']}): {store['ready_slots']}/{store['num_slots']} slots ready"
        f" · {_bytes(store['bytes_used'])} of {_bytes(store['num_slots'] * store['page_bytes'])}"
        f" · {store['loads']} loads · {store['evictions']} evictions"
        for store in stores
    ]
    workers = status["workers"]
    queries = sum(w.get("prefix_queries_tokens", 0) for w in workers)
    hits = sum(w.get("store_hits_tokens", 0) for w in workers)
    lines.append(f"prompt tokens loaded from the KV store: {pct(hits / queries if queries else 0.0)}")
    return lines


def pressure_table(workers: list[dict[str, Any]]) -> Columns:
    """Is the pool thrashing: per worker, over the thrash detector's sliding window, the share of
    computed tokens computed for the first time (goodput), preemptions and cached-block evictions
    per second, the share of evicted blocks needed again (refetch), the prefix-cache hit rate; the
    recomputed-token and block-wait totals and the admission margin."""
    table = Columns(
        ["worker", "thrashing", "goodput", "recomputed", "block waits", "preempt/s", "evict/s", "refetch", "hits", "window", "margin"]
    )
    for w in workers:
        table.rows.append([
            w["name"], "YES" if w.get("kv_thrashing") else "no", pct(w.get("goodput", 1.0)), str(w.get("recomputed_tokens", 0)),
            str(w.get("block_waits", 0)), f"{w.get('preemptions_per_s', 0.0):.2f}", f"{w.get('evictions_per_s', 0.0):.1f}", pct(w.get("refetch_share", 0.0)),
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
        "saves", "loads", "failed saves", "failed loads", "evictions", "dropped", "save ms", "load ms",
    ])  # fmt: skip
    for store_id, s in stores.items():
        table.rows.append([
            store_id[:12], ",".join(workers[store_id]), s["policy"], str(s["num_slots"]), str(s["ready_slots"]),
            str(s["pinned_slots"]), str(s["saving_slots"]), str(s["quarantined_slots"]), str(s["free_slots"]),
            _bytes(s["bytes_used"]), str(s["saves"]), str(s["loads"]), str(s["failed_saves"]), str(s["failed_loads"]),
            str(s["evictions"]), str(s["dropped_saves"]), _mean_ms(s["save_seconds"]), _mean_ms(s["load_seconds"]),
        ])  # fmt: skip
    return table
