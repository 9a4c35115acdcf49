"""One request's measurements and the summary of a run: the JSON figures `pagedctl bench` reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from paged.ops.bench.server_metrics import ServerStats

Outcome = Literal["completed", "rejected", "failed"]


@dataclass
class RequestResult:
    outcome: Outcome  # rejected: the server refused it (HTTP error); failed: it broke after being accepted
    reason: str | None = None  # why it was rejected or failed
    prompt_tokens: int = 0
    output_tokens: int = 0  # over all n choices
    ttft: float | None = None  # seconds to the first token of any choice
    latency: float | None = None  # seconds to the end of the last choice
    tpot: float | None = None  # mean seconds per output token after the first, per choice
    itls: list[float] = field(default_factory=list)  # gaps between consecutive tokens of each choice
    kind: str = ""  # the workload's class of this request (RequestSpec.kind)


def latency_stats(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/mean in milliseconds; None when nothing was measured."""
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(seconds) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean())}


def _rounded_ms(seconds: list[float]) -> list[float]:
    return [round(s * 1000.0, 3) for s in seconds]


def _latencies(done: list[RequestResult]) -> tuple[list[float], list[float], list[float]]:
    """TTFTs, TPOTs and inter-token gaps of completed requests, in seconds."""
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [r.tpot for r in done if r.tpot is not None]
    return ttfts, tpots, [gap for r in done for gap in r.itls]


def by_kind(done: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """Per class of request (workloads that have them): how many completed, and their latencies."""
    kinds: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in done if r.kind}):
        ttfts, tpots, itls = _latencies([r for r in done if r.kind == kind])
        kinds[kind] = {"completed": len(ttfts), "ttft_ms": latency_stats(ttfts), "tpot_ms": latency_stats(tpots), "itl_ms": latency_stats(itls)}
    return kinds


def summarize(results: list[RequestResult], duration_s: float, server: ServerStats | None) -> dict[str, Any]:
    """The run's figures. Every request sent is accounted for: sent = completed + rejected + failed."""
    done = [r for r in results if r.outcome == "completed"]
    ttfts, tpots, itls = _latencies(done)
    latencies = [r.latency for r in done if r.latency is not None]
    duration_s = max(duration_s, 1e-9)
    return {
        "requests_sent": len(results),
        "requests_completed": len(done),
        "requests_rejected": sum(r.outcome == "rejected" for r in results),
        "requests_failed": sum(r.outcome == "failed" for r in results),
        "rejection_reasons": dict(Counter(r.reason for r in results if r.outcome == "rejected")),
        "failure_reasons": dict(Counter(r.reason for r in results if r.outcome == "failed")),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "input_tokens_per_s": sum(r.prompt_tokens for r in done) / duration_s,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / duration_s,
        "ttft_ms": latency_stats(ttfts),
        "tpot_ms": latency_stats(tpots),
        "itl_ms": latency_stats(itls),
        "e2e_latency_ms": latency_stats(latencies),
        **asdict(server or ServerStats()),
        "by_kind": by_kind(done),
        "samples_ms": {"ttft": _rounded_ms(ttfts), "tpot": _rounded_ms(tpots), "itl": _rounded_ms(itls)},
    }
