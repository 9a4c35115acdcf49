"""The human-readable side of the results: a Markdown table of every figure per system (and, for
workloads with classes of requests, each class's latencies), each other column carrying the ratio
reference / that system, and a table of the request-rate sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Summary = dict[str, Any]


def _stat(key: str, stat: str) -> Callable[[Summary], float | None]:
    return lambda summary: (summary.get(key) or {}).get(stat)


def _field(key: str) -> Callable[[Summary], float | None]:
    return lambda summary: summary.get(key)


# (row label, how to read it, format). A figure of the server's is a ServerStats field
# (ops/bench/server_metrics.py), which results.summarize takes whole under its name: adding one is
# that field, computed where the sampler stops, and a row here.
FIGURES: list[tuple[str, Callable[[Summary], float | None], str]] = [
    ("request throughput (req/s)", _field("request_throughput"), "{:.2f}"),
    ("input tokens/s", _field("input_tokens_per_s"), "{:.0f}"),
    ("output tokens/s", _field("output_tokens_per_s"), "{:.0f}"),
    ("TTFT p50 (ms)", _stat("ttft_ms", "p50"), "{:.0f}"),
    ("TTFT p90 (ms)", _stat("ttft_ms", "p90"), "{:.0f}"),
    ("TTFT p99 (ms)", _stat("ttft_ms", "p99"), "{:.0f}"),
    ("TPOT p50 (ms)", _stat("tpot_ms", "p50"), "{:.1f}"),
    ("TPOT p90 (ms)", _stat("tpot_ms", "p90"), "{:.1f}"),
    ("TPOT p99 (ms)", _stat("tpot_ms", "p99"), "{:.1f}"),
    ("ITL p50 (ms)", _stat("itl_ms", "p50"), "{:.1f}"),
    ("ITL p90 (ms)", _stat("itl_ms", "p90"), "{:.1f}"),
    ("ITL p99 (ms)", _stat("itl_ms", "p99"), "{:.1f}"),
    ("end-to-end p50 (ms)", _stat("e2e_latency_ms", "p50"), "{:.0f}"),
    ("KV utilization mean", _field("kv_utilization_mean"), "{:.1%}"),
    ("KV utilization peak", _field("kv_utilization_peak"), "{:.1%}"),
    ("KV blocks used peak", _field("kv_memory_used_peak"), "{:.1%}"),
    ("peak concurrent sequences", _field("peak_concurrency"), "{:.0f}"),
    ("prefix-cache hit rate", _field("prefix_hit_rate"), "{:.1%}"),
    ("of which KV store", _field("store_hit_rate"), "{:.1%}"),
    ("preemptions", _field("preemptions"), "{:.0f}"),
    ("block waits", _field("block_waits"), "{:.0f}"),
    ("KV transfers (prefill → decode)", _field("kv_transfers"), "{:.0f}"),
    ("KV transfer mean (ms)", _field("kv_transfer_mean_ms"), "{:.1f}"),
    ("recomputed tokens", _field("recomputed_tokens"), "{:.0f}"),
    ("recomputed / computed tokens", _field("recompute_share"), "{:.2%}"),
    ("time thrashing", _field("thrashing_share"), "{:.0%}"),
]
# Per class of request (RequestSpec.kind): (label, latency key, statistic, format)
KIND_FIGURES = [
    ("TTFT p50 (ms)", "ttft_ms", "p50", "{:.0f}"),
    ("TTFT p99 (ms)", "ttft_ms", "p99", "{:.0f}"),
    ("TPOT p50 (ms)", "tpot_ms", "p50", "{:.1f}"),
    ("TPOT p99 (ms)", "tpot_ms", "p99", "{:.1f}"),
    ("ITL p99 (ms)", "itl_ms", "p99", "{:.1f}"),
]


def _kind_stat(kind: str, key: str, stat: str) -> Callable[[Summary], float | None]:
    return lambda summary: ((summary.get("by_kind") or {}).get(kind, {}).get(key) or {}).get(stat)


def figures(systems: dict[str, Summary]) -> list[tuple[str, Callable[[Summary], float | None], str]]:
    """Every figure of the table: FIGURES, then each class of request's latencies."""
    kinds = sorted({kind for summary in systems.values() for kind in summary.get("by_kind") or {}})
    return FIGURES + [
        (f"{label} [{kind}]", _kind_stat(kind, key, stat), fmt) for kind in kinds for label, key, stat, fmt in KIND_FIGURES
    ]


def ratio(paged: float | None, baseline: float | None) -> float | None:
    if paged is None or baseline is None or baseline == 0:
        return None
    return paged / baseline


def ratios(systems: dict[str, Summary], reference: str) -> dict[str, dict[str, float | None]]:
    """For each other system: figure label -> reference / that system."""
    paged = systems[reference]
    return {
        name: {label: ratio(read(paged), read(summary)) for label, read, _ in figures(systems)}
        for name, summary in systems.items() if name != reference
    }


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(systems: dict[str, Summary]) -> str:
    """Rows: figures; columns: systems, the reference first. Other cells read `value (×ratio)` with
    ratio = reference / that system."""
    names = list(systems)
    reference = names[0]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    counts = [f"{systems[name]['requests_completed']} / {systems[name]['requests_sent']}" for name in names]
    lines.append("| requests completed / sent | " + " | ".join(counts) + " |")
    for label, read, fmt in figures(systems):
        cells = []
        for name in names:
            value = read(systems[name])
            cell = _cell(value, fmt)
            factor = ratio(read(systems[reference]), value) if name != reference else None
            cells.append(f"{cell} (×{factor:.2f})" if factor is not None else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n(×r: {reference} / that column)\n" if len(names) > 1 else "\n")


def sweep_table(sweep: dict[str, list[Summary]]) -> str:
    """One row per (system, offered load) of a --compare sweep."""
    lines = [
        "| system | offered load | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | peak seqs | rejected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, points in sweep.items():
        for point in points:
            load = f"{point['concurrency']} in flight" if point.get("concurrency") else f"{point['request_rate']:g} req/s"
            lines.append(
                f"| {name} | {load} | {point['request_throughput']:.2f} | {point['output_tokens_per_s']:.0f} | "
                f"{_cell(point['ttft_ms']['p50'], '{:.0f}')} | {_cell(point['ttft_ms']['p99'], '{:.0f}')} | "
                f"{_cell(point['tpot_ms']['p50'], '{:.1f}')} | {_cell(point['peak_concurrency'], '{:.0f}')} | "
                f"{point['requests_rejected'] + point['requests_failed']} |"
            )
    return "\n".join(lines) + "\n"
