"""Runs one workload against every system of a comparison — paged under test (once per workers
layout when given: `paged:2`, `paged:1p1d`, the first the reference), paged baselines started as
subprocesses, the transformers static-batch baseline — at the main load and at each swept rate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paged.ops.bench.loadgen import LoadShape, run_load, warm_up
from paged.ops.bench.model_info import ModelInfo, served_model
from paged.ops.bench.report import ratios
from paged.ops.bench.results import RequestResult, summarize
from paged.ops.bench.servers import SERVER_CONFIGS, running_server
from paged.ops.bench.server_metrics import ServerStats, pool_tokens
from paged.ops.bench.workloads import RequestSpec, build_workload, system_prompts

HF_BASELINE = "hf-static"
# About the workload, not a system's figures: the distinct system prompts asked and the paged server's KV pool.
WORKLOAD_KEYS = ("system_prompts", "system_prompt_tokens", "pool_tokens")
BASELINES = (*[name for name in SERVER_CONFIGS if name != "paged"], HF_BASELINE)


@dataclass(frozen=True)
class BenchPlan:
    workload: str
    num_requests: int
    shape: LoadShape
    url: str | None = None  # the paged server under test; None: start one from model_dir
    model_dir: Path | None = None
    baselines: tuple[str, ...] = ()
    sweep_rates: tuple[float, ...] = ()  # --compare: the offered request rates to sweep
    server_args: tuple[str, ...] = ()  # options for every server the tool starts (same KV memory for all)
    server_port: int | None = None  # where the servers the tool starts listen, one at a time; None: a free port
    hf_batch_size: int = 8
    metrics_interval: float = 0.25
    log_dir: Path = field(default_factory=lambda: Path("bench-logs"))
    # shared-prefix: distinct system prompts adding up to this many times the KV pool of the paged
    # server under test (read from its /metrics); None: one shared system prompt
    prefix_working_set: float | None = None
    workers_layouts: tuple[str, ...] = ()  # --workers-layout: paged under test once per layout, side by side

    def paged_systems(self) -> list[str]:
        """The systems under test, the reference first."""
        return [f"{LAYOUT_SYSTEM}{layout}" for layout in self.workers_layouts] or ["paged"]


LAYOUT_SYSTEM = "paged:"


def server_options(system: str) -> list[str]:
    """The `pagedd serve` options that make a system."""
    if system.startswith(LAYOUT_SYSTEM):
        return ["--workers-layout", system.removeprefix(LAYOUT_SYSTEM)]
    return SERVER_CONFIGS[system]


def _shape_fields(plan: BenchPlan, system: str, shape: LoadShape) -> dict[str, Any]:
    rate = None if shape.concurrency or shape.request_rate == float("inf") else shape.request_rate
    return {"system": system, "workload": plan.workload, "num_requests": plan.num_requests,
            "request_rate": rate, "concurrency": shape.concurrency, "seed": shape.seed}


@contextmanager
def _server_url(plan: BenchPlan, system: str) -> Iterator[str | None]:
    if system == HF_BASELINE:
        yield None
    elif system == "paged" and plan.url:
        yield plan.url
    else:
        if plan.model_dir is None:
            raise ValueError(f"--model is needed to start the {system!r} server")
        args = [*plan.server_args, *server_options(system)]  # a baseline's own options win
        with running_server(plan.model_dir, system, args, plan.log_dir, plan.server_port) as url:
            yield url


def _run_once(plan: BenchPlan, system: str, url: str | None, served_name: str, specs: list[RequestSpec],
              shape: LoadShape) -> tuple[list[RequestResult], float, ServerStats]:
    label = f"{system} {plan.workload}"
    if url is None:
        from paged.ops.bench.baseline_hf import run_hf_static  # imports torch and transformers only when asked for

        assert plan.model_dir is not None
        return run_hf_static(plan.model_dir, specs, shape, plan.hf_batch_size, label)
    return run_load(url, served_name, specs, shape, label, plan.metrics_interval)


def _working_set(plan: BenchPlan, url: str | None) -> tuple[int, int | None]:
    """(shared-prefix working set in tokens, the paged server's KV pool in tokens) for the workload."""
    if plan.prefix_working_set is None:
        return 0, None
    pool = pool_tokens(url) if url else None
    if pool is None:
        raise ValueError("--prefix-working-set needs the paged server's pool size from its /metrics")
    return int(plan.prefix_working_set * pool), pool


def run_plan(plan: BenchPlan, model: ModelInfo) -> dict[str, Any]:
    """The results document: the reference run's figures at the top level (its `system` names it),
    then the other systems (`baselines`), ratios and sweep. The workload is built once the first
    server is up (a shared-prefix working set is sized by its pool)."""
    specs: list[RequestSpec] = []
    workload: dict[str, Any] = {}
    systems: dict[str, dict[str, Any]] = {}
    sweep: dict[str, list[dict[str, Any]]] = {}
    reference, *others = plan.paged_systems()
    for system in (reference, *others, *plan.baselines):
        with _server_url(plan, system) as url:
            if not specs:
                working_set, pool = _working_set(plan, url)
                specs = build_workload(plan.workload, model, plan.num_requests, plan.shape.seed, working_set)
                count, tokens = system_prompts(specs)
                workload = {"system_prompts": count, "system_prompt_tokens": tokens, "pool_tokens": pool} if working_set else {}
            served_name = (served_model(url)[0] if url else None) or model.name
            if url is not None:
                warm_up(url, served_name, RequestSpec(specs[0].prompt[:16], 4))
            results, duration, server = _run_once(plan, system, url, served_name, specs, plan.shape)
            systems[system] = summarize(results, duration, server) | _shape_fields(plan, system, plan.shape)
            for rate in plan.sweep_rates:
                shape = LoadShape(request_rate=rate, seed=plan.shape.seed, stall_timeout=plan.shape.stall_timeout)
                if shape == plan.shape:  # the main run is this point of the sweep already
                    point = dict(systems[system])
                else:
                    results, duration, server = _run_once(plan, system, url, served_name, specs, shape)
                    point = summarize(results, duration, server) | _shape_fields(plan, system, shape)
                point.pop("samples_ms")
                point.pop("kv_timeline")
                sweep.setdefault(system, []).append(point)
    return systems[reference] | workload | {
        "baselines": {name: summary for name, summary in systems.items() if name != reference},
        "ratios": ratios(systems, reference) if len(systems) > 1 else {},
        "sweep": sweep,
    }


def systems_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-system summaries of a results document, the reference first."""
    reference = {key: value for key, value in document.items() if key not in ("baselines", "ratios", "sweep", *WORKLOAD_KEYS)}
    return {reference.get("system", "paged"): reference, **document["baselines"]}
