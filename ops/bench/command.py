"""`pagedctl bench`: the command line of the benchmark."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown

from paged.ops.bench import plots
from paged.ops.bench.loadgen import LoadShape
from paged.ops.bench.model_info import resolve_model_info
from paged.ops.bench.report import markdown_table, sweep_table
from paged.ops.bench.runner import BASELINES, BenchPlan, run_plan, systems_of
from paged.ops.bench.servers import ServerStartError, split_server_args
from paged.ops.bench.workloads import WORKLOADS
from paged.shared.workers_layout import parse_workers_layout


def _float_list(_: click.Context, __: click.Parameter, value: str | None) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in value.split(",")) if value else ()
    except ValueError as error:
        raise click.BadParameter("expected comma-separated request rates, e.g. 1,2,4") from error


def _baseline_list(_: click.Context, __: click.Parameter, value: str | None) -> tuple[str, ...]:
    names = tuple(item.strip() for item in value.split(",")) if value else ()
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise click.BadParameter(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    return names


def _layout_list(_: click.Context, __: click.Parameter, value: str | None) -> tuple[str, ...]:
    layouts = tuple(item.strip() for item in value.split(",")) if value else ()
    for layout in layouts:
        try:
            parse_workers_layout(layout)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return layouts


def write_report(document: dict, output_dir: Path) -> str:
    """results.md and the PNG plots under output_dir; returns the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    systems = systems_of(document)
    markdown = f"## {document['workload']}: {document['requests_sent']} requests\n\n"
    if document.get("pool_tokens"):
        markdown += (
            f"{document['system_prompts']} distinct system prompts asked, {document['system_prompt_tokens']} tokens in all: "
            f"{document['system_prompt_tokens'] / document['pool_tokens']:.1f}× the KV pool ({document['pool_tokens']} tokens).\n\n"
        )
    markdown += markdown_table(systems)
    plots.latency_cdfs(systems, output_dir / "latency_cdf.png")
    plots.kv_utilization(systems, output_dir / "kv_utilization.png")
    if document["sweep"]:
        markdown += "\n### request-rate sweep\n\n" + sweep_table(document["sweep"])
        plots.throughput_vs_rate(document["sweep"], output_dir / "throughput_vs_rate.png")
    (output_dir / "results.md").write_text(markdown)
    return markdown


@click.command(context_settings={"max_content_width": 110})
@click.option("--url", help="The paged server under test, e.g. http://127.0.0.1:8000. Omitted: started from --model.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint directory: its tokenizer gives the prompt vocabulary; needed to start servers and for hf-static.")
@click.option("--workload", type=click.Choice(list(WORKLOADS)), default="mixed", show_default=True)
@click.option("--num-requests", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--request-rate", type=float, default=float("inf"), show_default=True,
              help="Open loop: Poisson arrivals per second (inf: all at once).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Closed loop: requests in flight (instead of --request-rate).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the workload and the arrivals.")
@click.option("--max-model-len", type=click.IntRange(min=2), help="Context window of the workload and of the servers this tool starts (default: the server's or the checkpoint's).")
@click.option("--baselines", callback=_baseline_list, help=f"Comma-separated, from: {', '.join(BASELINES)}.")
@click.option("--workers-layout", "workers_layouts", callback=_layout_list,
              help="Comma-separated workers layouts, e.g. 2,1p1d: start paged once with each (`pagedd serve --workers-layout`) "
                   "and report them side by side, the first as the reference.")
@click.option("--compare", "sweep_rates", callback=_float_list, help="Also sweep these request rates, e.g. 1,2,4,8.")
@click.option("--kv-cache-memory", help="KV memory for every server this tool starts (e.g. 16MiB), so all compare at one budget.")
@click.option("--kv-offload-memory", help="Host KV store for every server this tool starts (e.g. 64MiB); the no-kv-store baseline runs without.")
@click.option("--prefix-working-set", type=click.FloatRange(min=0, min_open=True),
              help="shared-prefix: distinct system prompts adding up to this many times the KV pool [default: one system prompt].")
@click.option("--server-arg", "server_args", multiple=True,
              help="Extra options for the servers this tool starts, split like a shell would (repeatable): --server-arg '--max-num-seqs 8'.")
@click.option("--server-port", type=click.IntRange(1, 65535),
              help="Port of the servers this tool starts; they run one at a time (also --server-arg '--port N') [default: a free port].")
@click.option("--hf-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--stall-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a request may receive nothing before it counts as failed.")
@click.option("--metrics-interval", type=float, default=0.25, show_default=True, help="Seconds between /metrics samples.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where results.json, results.md, the PNG plots and the server logs go [default: bench-results/WORKLOAD-DATE-TIME].")
@click.option("--output-json", type=click.Path(dir_okay=False, path_type=Path), help="The results JSON [default: OUTPUT_DIR/results.json].")
def bench(url: str | None, model_dir: Path | None, workload: str, num_requests: int, request_rate: float,
          concurrency: int | None, seed: int, max_model_len: int | None, baselines: tuple[str, ...], workers_layouts: tuple[str, ...],
          sweep_rates: tuple[float, ...], kv_cache_memory: str | None, kv_offload_memory: str | None, prefix_working_set: float | None,
          server_args: tuple[str, ...], server_port: int | None,
          hf_batch_size: int, stall_timeout: float, metrics_interval: float, output_dir: Path | None, output_json: Path | None) -> None:
    """Benchmark a paged server: throughput, latency and KV memory, optionally against baselines."""
    if concurrency and request_rate != float("inf"):
        raise click.UsageError("give --request-rate or --concurrency, not both")
    if url is None and model_dir is None:
        raise click.UsageError("give --url of a running server, or --model to start one")
    if url is not None and workers_layouts:
        raise click.UsageError("--workers-layout starts a server per layout: give --model, not --url")
    try:
        argv, port_in_args = split_server_args(server_args)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--server-arg") from None
    if server_port and port_in_args and server_port != port_in_args:
        raise click.UsageError(f"--server-port {server_port} and --server-arg --port {port_in_args} disagree")
    server_args = tuple(argv)
    output_dir = output_dir or Path("bench-results") / f"{workload}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_json = output_json or output_dir / "results.json"
    if prefix_working_set and workload != "shared-prefix":
        raise click.UsageError("--prefix-working-set sizes the shared-prefix workload only")
    if kv_cache_memory:
        server_args = ("--kv-cache-memory", kv_cache_memory, *server_args)
    if kv_offload_memory:
        server_args = ("--kv-offload-memory", kv_offload_memory, *server_args)
    if max_model_len:  # the servers this tool starts get the workload's context window (and size their pool by it)
        server_args = ("--max-model-len", str(max_model_len), *server_args)
    plan = BenchPlan(
        workload=workload, num_requests=num_requests,
        shape=LoadShape(request_rate=request_rate, concurrency=concurrency, seed=seed, stall_timeout=stall_timeout),
        url=url.rstrip("/") if url else None, model_dir=model_dir, baselines=baselines, sweep_rates=sweep_rates,
        server_args=server_args, server_port=server_port or port_in_args, hf_batch_size=hf_batch_size,
        metrics_interval=metrics_interval, log_dir=output_dir / "logs", prefix_working_set=prefix_working_set,
        workers_layouts=workers_layouts,
    )
    # SIGTERM unwinds like Ctrl-C, so the servers this tool started are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    model = resolve_model_info(plan.url, model_dir, max_model_len)
    try:
        document = run_plan(plan, model)
    except (ServerStartError, ValueError) as error:  # ValueError: what the plan needs and lacks, said for the user
        raise click.ClickException(str(error)) from None
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(document, indent=1))
    console = Console()
    console.print(Markdown(write_report(document, output_dir)))
    console.print(f"results: {output_json}, report and plots: {output_dir}")
