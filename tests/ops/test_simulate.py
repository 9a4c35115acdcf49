"""The simulator: a small run through the CLI, JSON keys and the expected ordering of results."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from paged.ops.simulate import main, make_workload

KEYS = {
    "kv_utilization_mean", "kv_utilization_peak", "pool_used_mean", "running_mean", "peak_concurrency", "steps",
    "prefix_hit_rate", "preemptions", "recomputed_tokens", "recompute_share", "thrashing_steps",
}  # fmt: skip


def test_json_has_every_figure_for_every_configuration() -> None:
    result = CliRunner().invoke(main, ["--num-requests", "60", "--num-blocks", "512", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    configs = report["configs"]
    assert set(configs) == {"paged/prefix-on", "paged/prefix-off", "contiguous"}
    for figures in configs.values():
        assert KEYS <= set(figures)
        assert 0.0 < figures["kv_utilization_mean"] <= figures["kv_utilization_peak"] <= 1.0
        assert figures["steps"] > 0 and figures["peak_concurrency"] > 0
    paged, no_cache, contiguous = (configs[name] for name in ("paged/prefix-on", "paged/prefix-off", "contiguous"))
    assert paged["prefix_hit_rate"] > 0.0 and no_cache["prefix_hit_rate"] == contiguous["prefix_hit_rate"] == 0.0
    # Paging stores tokens in nearly every reserved slot; whole-length reservations do not.
    assert paged["kv_utilization_mean"] > contiguous["kv_utilization_mean"]
    assert paged["peak_concurrency"] > contiguous["peak_concurrency"]
    assert report["workload"]["num_requests"] == 60
    for figures in configs.values():
        assert 0.0 <= figures["recompute_share"] < 1.0 and figures["recomputed_tokens"] >= 0


def test_greedy_admission_preempts_where_predictive_does_not() -> None:
    """A pool far smaller than the offline workload: greedy admission over-commits it."""
    reports = {}
    for policy in ("greedy", "predictive"):
        args = ["--num-requests", "150", "--num-blocks", "400", "--config", "paged/prefix-on", "--jobs", "1", "--json"]
        result = CliRunner().invoke(main, [*args, "--admission-policy", policy])
        assert result.exit_code == 0, result.output
        reports[policy] = json.loads(result.stdout)["configs"]["paged/prefix-on"]
    greedy, predictive = reports["greedy"], reports["predictive"]
    assert greedy["preemptions"] > 10 * max(predictive["preemptions"], 1)
    assert greedy["recomputed_tokens"] > predictive["recomputed_tokens"]
    assert predictive["kv_utilization_mean"] > 0.95


def test_table_output() -> None:
    result = CliRunner().invoke(main, ["--num-requests", "20", "--num-blocks", "512", "--config", "contiguous"])
    assert result.exit_code == 0, result.output
    assert "contiguous" in result.output and "KV util" in result.output


def test_workload_is_reproducible_and_in_range() -> None:
    first, second = make_workload(200, seed=3), make_workload(200, seed=3)
    assert first.prompts == second.prompts and first.output_lens == second.output_lens
    assert all(10 <= len(prompt) <= 2000 for prompt in first.prompts)
    assert all(10 <= length <= 1000 for lengths in first.output_lens for length in lengths)
    assert {len(lengths) for lengths in first.output_lens} == {1, 4}


def test_an_in_process_run_leaves_no_frozen_objects_behind() -> None:
    """The simulator freezes its workload out of the collector's reach; run in-process (as these tests
    do), it must thaw it again, or interpreter exit never frees what was alive and triton's nanobind
    bindings print "nanobind: leaked N instances" after pytest's summary."""
    script = (
        "import triton.language\n"
        "from click.testing import CliRunner\n"
        "from paged.ops.simulate import main\n"
        "result = CliRunner().invoke(main, ['--num-requests', '20', '--num-blocks', '512', '--jobs', '1', '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nanobind" not in done.stderr, done.stderr[:500]
