"""The offline engine (ops/offline_engine.py) and `pagedd generate`: the scheduler and a worker in
one process, driven by the same step pipeline as the server."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from paged.ops.offline_engine import OfflineEngine
from paged.ops.pagedd import main as pagedd
from paged.shared.config import CacheConfig, ModelConfig, MiB, SchedulerConfig
from paged.shared.sampling_params import SamplingParams


def test_greedy_generation_is_repeatable_and_n_shares_the_prompt(stories_dir: Path) -> None:
    engine = OfflineEngine(ModelConfig(model=str(stories_dir), device="cpu"), CacheConfig(kv_cache_memory=4 * MiB), SchedulerConfig())
    prompt = engine.encode_prompt("Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = engine.generate([prompt, prompt[:3]], params)
    again = engine.generate([prompt, prompt[:3]], params)
    assert first == again and [len(tokens) for (tokens,) in first] == [12, 12]
    (pair,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2))
    assert pair == [first[0][0], first[0][0]]  # greedy: both continuations alike
    assert not engine.scheduler.has_unfinished_requests() and engine.scheduler.stats().used_blocks == 0


def test_pagedd_generate_prints_the_continuation(stories_dir: Path) -> None:
    result = CliRunner().invoke(pagedd, ["generate", "--model", str(stories_dir), "--device", "cpu", "--prompt", "Once upon a time", "--max-tokens", "8", "--n", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # logs go to stderr
    assert lines[0] == "--- 0" and "--- 1" in lines
    assert all(line.startswith("Once upon a time") for line in lines if not line.startswith("---"))
