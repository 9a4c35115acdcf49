"""Command-line options generated from the config Structs (shared/cli_options.py)."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from paged.ops.pagedd import main
from paged.shared.cli_options import ByteSize, build_config, config_options
from paged.shared.config import GiB, MiB, CacheConfig, ModelConfig, SchedulerConfig


@click.command()
@config_options(ModelConfig)
@config_options(CacheConfig)
@config_options(SchedulerConfig)
def configs(**kwargs: Any) -> None:
    click.echo(repr((build_config(ModelConfig, kwargs), build_config(CacheConfig, kwargs), build_config(SchedulerConfig, kwargs), kwargs)))


def run(*args: str) -> str:
    result = CliRunner().invoke(configs, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_defaults_are_the_structs_defaults() -> None:
    assert run() == repr((ModelConfig(), CacheConfig(), SchedulerConfig(), {})) + "\n"


def test_every_field_is_settable() -> None:
    output = run(
        "--model", "/m", "--dtype", "bfloat16", "--device", "cuda:1", "--attention-backend", "triton", "--max-model-len", "512",
        "--seed", "3", "--block-size", "32", "--kv-cache-memory", "64MiB", "--gpu-memory-utilization", "0.5",
        "--kv-allocator", "contiguous", "--no-prefix-caching", "--swap-space", "2GiB", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--scheduling-policy", "priority", "--max-waiting-requests", "10",
        "--max-waiting-tokens", "1000", "--kv-watermark", "0.05", "--preemption-mode", "swap",
    )  # fmt: skip
    expected = (
        ModelConfig(model="/m", dtype="bfloat16", device="cuda:1", attention_backend="triton", max_model_len=512, seed=3),
        CacheConfig(block_size=32, kv_cache_memory=64 * MiB, gpu_memory_utilization=0.5, kv_allocator="contiguous",
                    enable_prefix_caching=False, swap_space=2 * GiB),
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, scheduling_policy="priority", max_waiting_requests=10,
                        max_waiting_tokens=1000, kv_watermark=0.05, preemption_mode="swap"),
        {},
    )  # fmt: skip
    assert output == repr(expected) + "\n"


def test_bad_choice_is_a_usage_error() -> None:
    result = CliRunner().invoke(configs, ["--kv-allocator", "buddy"])
    assert result.exit_code == 2 and "buddy" in result.output


@pytest.mark.parametrize("text, size", [("1024", 1024), ("256MiB", 256 * MiB), ("4GiB", 4 * GiB), ("1.5k", 1500), ("2 gb", 2 * 10**9)])
def test_byte_sizes(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


def test_byte_size_rejects_nonsense() -> None:
    with pytest.raises(click.BadParameter):
        ByteSize().convert("lots", None, None)


@pytest.mark.parametrize(
    "command, present, absent",
    [
        ("worker", ["--endpoint", "--model", "--kv-cache-memory", "--gpu-memory-utilization", "--max-num-batched-tokens", "--null-model", "--on-gateway-loss"], ["--max-num-seqs", "--kv-allocator", "--port"]),
        ("gateway", ["--worker", "--model", "--block-size", "--kv-allocator", "--no-prefix-caching", "--max-num-seqs", "--preemption-mode", "--port"], ["--kv-cache-memory", "--dtype"]),
        ("serve", ["--model", "--dtype", "--device", "--kv-cache-memory", "--swap-space", "--max-num-seqs", "--workers", "--null-model", "--host", "--port"], []),
    ],
)
def test_each_side_takes_its_options(command: str, present: list[str], absent: list[str]) -> None:
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in present:
        assert option in result.output, option
    for option in absent:
        assert option not in result.output, option
