"""`pagedctl bench`: workloads are reproducible and fit the model, the results JSON carries every figure
with sane values, and no request is lost (sent = completed + rejected + failed, each with a reason).
Runs against a fake OpenAI-compatible server, and (marked slow) against a live `pagedd serve`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
import pytest

from paged.ops.bench.model_info import ModelInfo, resolve_model_info
from paged.ops.bench.servers import free_port, split_server_args
from paged.ops.bench.workloads import WORKLOADS, arrival_times, build_workload, system_prompts
from paged.ops.cli import main
from support.fake_openai_server import BLOCK_SIZE, BLOCKS_TOTAL, REJECT_EVERY, fake_server

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms")
TOP_LEVEL_KEYS = (
    "requests_sent", "requests_completed", "requests_failed", "requests_rejected", "request_throughput",
    "input_tokens_per_s", "output_tokens_per_s", *LATENCY_KEYS, "kv_utilization_mean", "kv_utilization_peak",
    "peak_concurrency", "prefix_hit_rate", "store_hit_rate", "preemptions", "block_waits", "recomputed_tokens", "recompute_share", "thrashing_share",
)
MODEL = ModelInfo(name="m", token_ids=tuple(range(3, 500)), max_model_len=512)


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    output = tmp_path / "results.json"
    main(["bench", *args, "--output-json", str(output), "--output-dir", str(tmp_path / "report")], standalone_mode=False)
    return json.loads(output.read_text())


def assert_sane(summary: dict[str, Any], server_side: bool = True) -> None:
    for key in TOP_LEVEL_KEYS:
        assert key in summary, key
    assert summary["requests_sent"] == summary["requests_completed"] + summary["requests_rejected"] + summary["requests_failed"]
    assert sum(summary["rejection_reasons"].values()) == summary["requests_rejected"]
    assert sum(summary["failure_reasons"].values()) == summary["requests_failed"]
    assert summary["requests_completed"] > 0
    for key in ("request_throughput", "input_tokens_per_s", "output_tokens_per_s"):
        assert summary[key] > 0, key
    for key in LATENCY_KEYS:
        stats = summary[key]
        assert set(stats) == {"p50", "p90", "p99", "mean"}
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert summary["ttft_ms"]["p50"] <= summary["e2e_latency_ms"]["p99"]
    if server_side:
        assert 0 < summary["kv_utilization_mean"] <= summary["kv_utilization_peak"] <= 1
        assert summary["peak_concurrency"] >= 1
        assert 0 <= summary["prefix_hit_rate"] <= 1
        assert summary["preemptions"] >= 0
        assert summary["recomputed_tokens"] >= 0 and 0 <= summary["recompute_share"] <= 1
        assert 0 <= summary["thrashing_share"] <= 1


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_are_reproducible_and_fit_the_context(name: str) -> None:
    specs = build_workload(name, MODEL, 40, seed=3)
    assert specs == build_workload(name, MODEL, 40, seed=3)
    assert specs != build_workload(name, MODEL, 40, seed=4)
    for spec in specs:
        assert len(spec.prompt) + spec.max_tokens <= MODEL.max_model_len
        assert spec.max_tokens >= 1 and set(spec.prompt) <= set(MODEL.token_ids)
    assert all(spec.n == (4 if name == "parallel" else 1) for spec in specs)


def test_shared_prefix_requests_share_a_long_system_prompt() -> None:
    specs = build_workload("shared-prefix", MODEL, 10, seed=0)
    prefix = MODEL.max_model_len // 2
    assert all(spec.prompt[:prefix] == specs[0].prompt[:prefix] for spec in specs)
    assert len({tuple(spec.prompt[prefix:]) for spec in specs}) == len(specs)


def test_a_shared_prefix_working_set_is_many_system_prompts_some_hot() -> None:
    specs = build_workload("shared-prefix", MODEL, 400, seed=0, prefix_working_set_tokens=3000)
    longest = MODEL.max_model_len // 2
    systems = Counter(tuple(spec.prompt[: spec.system_tokens]) for spec in specs)
    assert len(systems) > 8 and system_prompts(specs) == (len(systems), sum(len(system) for system in systems))
    assert 3000 - 2 * longest < system_prompts(specs)[1] <= 3000 + longest  # the tail may go unasked
    assert max(systems.values()) > 3 * 400 / len(systems)  # Zipf: the hottest far above the mean
    assert all(len(spec.prompt) + spec.max_tokens <= MODEL.max_model_len for spec in specs)
    assert all(len(spec.prompt) <= longest + 80 for spec in specs)


def test_the_working_set_is_sized_by_the_servers_pool(tmp_path: Path) -> None:
    with fake_server() as url:
        document = run_bench(tmp_path, "--url", url, "--workload", "shared-prefix", "--num-requests", "6", "--prefix-working-set", "0.5")
    assert document["pool_tokens"] == BLOCKS_TOTAL * BLOCK_SIZE
    assert document["system_prompts"] <= 6 and document["system_prompt_tokens"] <= BLOCKS_TOTAL * BLOCK_SIZE // 2 + 256
    assert f"{document['system_prompts']} distinct system prompts asked" in (tmp_path / "report" / "results.md").read_text()
    with pytest.raises(click.UsageError, match="shared-prefix workload only"):
        run_bench(tmp_path, "--url", url, "--workload", "mixed", "--prefix-working-set", "2")


def test_poisson_arrivals_have_the_requested_rate() -> None:
    times = arrival_times(2000, request_rate=10.0, seed=0)
    assert times == sorted(times) and times[0] == 0.0
    assert 9.0 < len(times) / times[-1] < 11.0
    assert arrival_times(5, float("inf"), seed=0) == [0.0] * 5


def test_prompt_vocabulary_excludes_special_tokens(stories_dir: Path) -> None:
    model = resolve_model_info(None, stories_dir, None)
    assert model.max_model_len == 512
    assert {0, 1, 2}.isdisjoint(model.token_ids) and len(model.token_ids) == 509


def test_open_loop_run_accounts_for_every_request(tmp_path: Path) -> None:
    with fake_server() as url:
        document = run_bench(tmp_path, "--url", url, "--workload", "mixed", "--num-requests", "30",
                             "--request-rate", "40", "--seed", "1", "--compare", "20,80", "--max-model-len", "160")
    assert_sane(document)
    assert document["requests_sent"] == 30
    assert document["requests_rejected"] > 0  # the fake server refuses prompts starting with a multiple of 5
    assert all(reason.startswith("HTTP 429") for reason in document["rejection_reasons"])
    specs = build_workload("mixed", ModelInfo("fake", tuple(range(3, 256)), 160), 30, seed=1)
    assert document["requests_rejected"] == sum(spec.prompt[0] % REJECT_EVERY == 0 for spec in specs)
    assert [point["request_rate"] for point in document["sweep"]["paged"]] == [20.0, 80.0]
    for point in document["sweep"]["paged"]:
        assert_sane(point)
    report = tmp_path / "report"
    assert "| request throughput (req/s) |" in (report / "results.md").read_text()
    for plot in ("latency_cdf.png", "kv_utilization.png", "throughput_vs_rate.png"):
        assert (report / plot).stat().st_size > 1000


def test_closed_loop_parallel_sampling_counts_every_choice(tmp_path: Path) -> None:
    with fake_server() as url:
        document = run_bench(tmp_path, "--url", url, "--workload", "parallel", "--num-requests", "12",
                             "--concurrency", "3", "--max-model-len", "96")
    assert_sane(document)
    assert document["concurrency"] == 3 and document["request_rate"] is None
    assert 4 <= document["peak_concurrency"] <= 3 * 4  # n=4 sequences per request, at most 3 requests in flight
    specs = build_workload("parallel", ModelInfo("fake", tuple(range(3, 256)), 96), 12, seed=0)
    completed = [spec for spec in specs if spec.prompt[0] % REJECT_EVERY]
    tokens = sum(4 * spec.max_tokens for spec in completed)
    assert document["output_tokens_per_s"] * document["duration_s"] == pytest.approx(tokens)


def test_stalled_requests_fail_with_a_reason(tmp_path: Path) -> None:
    with fake_server(stall_every=3) as url:
        document = run_bench(tmp_path, "--url", url, "--workload", "mixed", "--num-requests", "12",
                             "--max-model-len", "64", "--stall-timeout", "1")
    assert_sane(document)
    specs = build_workload("mixed", ModelInfo("fake", tuple(range(3, 256)), 64), 12, seed=0)
    stalled = sum(spec.prompt[0] % 3 == 0 and spec.prompt[0] % REJECT_EVERY != 0 for spec in specs)
    assert stalled > 0 and document["requests_failed"] == stalled
    assert list(document["failure_reasons"]) == ["ReadTimeout"]


def test_hf_static_baseline_and_ratios(tmp_path: Path, stories_dir: Path) -> None:
    with fake_server() as url:
        document = run_bench(tmp_path, "--url", url, "--model", str(stories_dir), "--workload", "mixed",
                             "--num-requests", "4", "--max-model-len", "40", "--baselines", "hf-static", "--hf-batch-size", "4")
    hf = document["baselines"]["hf-static"]
    assert_sane(hf)
    assert hf["requests_completed"] == 4 and hf["peak_concurrency"] == 4
    assert hf["ttft_ms"]["p50"] == hf["e2e_latency_ms"]["p50"]  # static batches: nothing before the batch ends
    ratio = document["ratios"]["hf-static"]["output tokens/s"]
    assert ratio == pytest.approx(document["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert "(×" in (tmp_path / "report" / "results.md").read_text()


def test_server_args_split_like_a_shell_and_give_up_their_port() -> None:
    assert split_server_args(("--max-num-seqs 8", "--no-prefix-caching")) == (["--max-num-seqs", "8", "--no-prefix-caching"], None)
    assert split_server_args(("--port=8123", "--block-size", "32")) == (["--block-size", "32"], 8123)
    assert split_server_args(("--port", "8124")) == ([], 8124)
    assert split_server_args(("--port 8125 --max-num-seqs 4",)) == (["--max-num-seqs", "4"], 8125)
    with pytest.raises(ValueError, match="port number"):
        split_server_args(("--port",))


def test_reports_go_to_a_named_directory_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with fake_server() as url:
        main(["bench", "--url", url, "--workload", "long", "--num-requests", "4", "--max-model-len", "64"], standalone_mode=False)
    [run] = (tmp_path / "bench-results").iterdir()
    assert run.name.startswith("long-")
    assert json.loads((run / "results.json").read_text())["requests_sent"] == 4
    assert "| request throughput (req/s) |" in (run / "results.md").read_text()
    assert (run / "latency_cdf.png").stat().st_size > 1000 and (run / "kv_utilization.png").stat().st_size > 1000


@pytest.mark.slow
def test_live_server(tmp_path: Path, stories_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tool starts `pagedd serve` itself (no --url) on the port given through --server-arg, says
    what it waits for, runs a short burst, reads its /metrics, stops it."""
    port = free_port()
    document = run_bench(tmp_path, "--model", str(stories_dir), "--kv-cache-memory", "1MiB", "--workload", "shared-prefix",
                         "--num-requests", "16", "--max-model-len", "96", "--metrics-interval", "0.05",
                         "--server-arg", f"--port {port}")
    assert_sane(document)
    assert document["requests_completed"] == 16, document["failure_reasons"] | document["rejection_reasons"]
    assert document["prefix_hit_rate"] > 0.3  # 48 of every ~70 prompt tokens are the shared system prompt
    progress = capsys.readouterr().err
    assert f"starting pagedd serve (paged) on port {port}: 0 s" in progress and f"port {port}: ready" in progress


@pytest.mark.slow
def test_live_store_comparison(tmp_path: Path, stories_dir: Path) -> None:
    """The KV store tier against the same server without it, in one run: a working set of system
    prompts three times the pool, prefixes evicted from the pool come back from the store."""
    document = run_bench(tmp_path, "--model", str(stories_dir), "--kv-cache-memory", "1MiB", "--kv-offload-memory", "4MiB",
                         "--workload", "shared-prefix", "--prefix-working-set", "3", "--num-requests", "40", "--concurrency", "2",
                         "--max-model-len", "256", "--baselines", "no-kv-store")  # fmt: skip
    without = document["baselines"]["no-kv-store"]
    assert document["requests_completed"] == without["requests_completed"] == 40
    assert document["system_prompt_tokens"] > document["pool_tokens"]  # of the 3x built, 40 requests ask fewer
    assert document["store_hit_rate"] > 0 and without["store_hit_rate"] == 0
    assert document["prefix_hit_rate"] > without["prefix_hit_rate"]


def test_long_prompt_mix_puts_long_prompts_among_steady_decodes() -> None:
    model = ModelInfo(name="m", token_ids=tuple(range(3, 500)), max_model_len=2048)
    specs = build_workload("long-prompt-mix", model, 40, seed=0)
    long_prompts = [spec for spec in specs if spec.kind == "long-prompt"]
    decodes = [spec for spec in specs if spec.kind == "decode"]
    assert len(long_prompts) == 10 and len(decodes) == 30
    assert all(1400 <= len(spec.prompt) <= 1600 and spec.max_tokens <= 16 for spec in long_prompts)
    assert all(len(spec.prompt) <= 128 and spec.max_tokens >= 96 for spec in decodes)


def test_the_report_shows_each_class_of_request_apart() -> None:
    from paged.ops.bench.report import markdown_table
    from paged.ops.bench.results import RequestResult, summarize

    def result(kind: str, ttft: float, tpot: float) -> RequestResult:
        return RequestResult("completed", prompt_tokens=10, output_tokens=5, ttft=ttft, latency=ttft + 4 * tpot, tpot=tpot, itls=[tpot] * 4, kind=kind)

    one = summarize([result("decode", 0.1, 0.02), result("long-prompt", 0.9, 0.05)], 1.0, None) | {"system": "paged:2"}
    two = summarize([result("decode", 0.2, 0.01), result("long-prompt", 1.5, 0.04)], 1.0, None) | {"system": "paged:1p1d"}
    assert one["by_kind"]["decode"]["tpot_ms"]["p99"] == pytest.approx(20.0) and one["by_kind"]["decode"]["completed"] == 1
    table = markdown_table({"paged:2": one, "paged:1p1d": two})
    assert "| TPOT p99 (ms) [decode] | 20.0 | 10.0 (×2.00) |" in table
    assert "| TTFT p50 (ms) [long-prompt] | 900 | 1500 (×0.60) |" in table
    assert "(×r: paged:2 / that column)" in table


@pytest.mark.slow
def test_workers_layouts_side_by_side(tmp_path: Path, stories_dir: Path) -> None:
    """`--workers-layout 2,1p1d`: paged started once per layout, the first the reference; the 1p1d run
    hands every request over from its prefill worker to its decode worker."""
    document = run_bench(tmp_path, "--model", str(stories_dir), "--workers-layout", "2,1p1d", "--workload", "long-prompt-mix",
                         "--num-requests", "8", "--request-rate", "4", "--max-model-len", "512", "--kv-cache-memory", "4MiB")
    assert document["system"] == "paged:2" and list(document["baselines"]) == ["paged:1p1d"]
    one_p_one_d = document["baselines"]["paged:1p1d"]
    for summary in (document, one_p_one_d):
        assert_sane(summary)
        assert summary["requests_completed"] == 8 and set(summary["by_kind"]) == {"decode", "long-prompt"}
    assert document["kv_transfers"] == 0 and one_p_one_d["kv_transfers"] == 8
    assert "TPOT p99 (ms) [decode]" in (tmp_path / "report" / "results.md").read_text()
    assert {path.name for path in (tmp_path / "report" / "logs").iterdir()} == {"server-paged-2.log", "server-paged-1p1d.log"}


async def test_event_stream_lines_split_only_at_line_feeds() -> None:
    """A chunk's text may hold U+0085 or U+2028 unescaped (valid JSON), which str.splitlines and
    httpx's aiter_lines would cut the chunk at."""
    import httpx

    from paged.ops.bench.loadgen import sse_lines

    body = 'data: {"text": "a\u2028b\x85c"}\r\n\ndata: [DONE]\n\n'.encode()
    response = httpx.Response(200, content=body)
    lines = [line async for line in sse_lines(response)]
    assert lines == ['data: {"text": "a\u2028b\x85c"}', "", "data: [DONE]", ""]
