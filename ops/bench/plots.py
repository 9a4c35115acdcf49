"""PNG plots of a benchmark (matplotlib, headless): latency CDFs, KV utilization over time, and
throughput and latency against the offered request rate from a --compare sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

Summary = dict[str, Any]


def latency_cdfs(systems: dict[str, Summary], path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, title) in zip(axes, [("ttft", "time to first token"), ("tpot", "time per output token"), ("itl", "inter-token latency")]):
        for name, summary in systems.items():
            values = np.sort(summary["samples_ms"][key])
            if len(values):
                axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
        axis.set(title=title, xlabel="ms (log scale)", ylabel="fraction of requests" if key != "itl" else "fraction of tokens", xscale="log")
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def kv_utilization(systems: dict[str, Summary], path: Path) -> None:
    """Server-reported KV utilization (slots holding tokens / slots reserved) and blocks in use, over time."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for name, summary in systems.items():
        timeline = np.asarray(summary.get("kv_timeline") or [])
        if len(timeline):
            top.plot(timeline[:, 0], timeline[:, 1], label=name)
            bottom.plot(timeline[:, 0], timeline[:, 2], label=name)
    top.set(ylabel="KV utilization", ylim=(0, 1.05), title="KV cache over the run")
    bottom.set(ylabel="fraction of KV blocks used", xlabel="seconds", ylim=(0, 1.05))
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    top.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def throughput_vs_rate(sweep: dict[str, list[Summary]], path: Path) -> None:
    """Left: achieved output throughput against offered request rate. Right: the throughput-latency curve."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, points in sweep.items():
        points = [p for p in points if p.get("request_rate") not in (None, float("inf"))] or points
        offered = [p["request_rate"] if p.get("request_rate") not in (None, float("inf")) else p["concurrency"] for p in points]
        throughput = [p["output_tokens_per_s"] for p in points]
        (line,) = left.plot(offered, throughput, marker="o", label=name)
        color = line.get_color()  # one colour per system on both panels
        right.plot(throughput, [p["ttft_ms"]["p50"] for p in points], marker="o", color=color, label=f"{name} TTFT p50")
        right.plot(throughput, [p["e2e_latency_ms"]["p50"] for p in points], marker="s", linestyle="--", color=color,
                   label=f"{name} end-to-end p50")
    left.set(xlabel="offered load (req/s)", ylabel="output tokens/s", title="throughput vs request rate")
    right.set(xlabel="output tokens/s", ylabel="ms", yscale="log", title="latency vs throughput")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
