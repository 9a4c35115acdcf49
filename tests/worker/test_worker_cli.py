"""`paged-worker`: the worker's own program, the same options as `pagedd worker` plus logging."""

from __future__ import annotations

import subprocess
import sys

from support.daemon_process import PROJECT_ROOT


def test_paged_worker_takes_the_worker_options_and_logging() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "paged.worker.cli", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: paged-worker [OPTIONS]")
    for option in ("--endpoint", "--model", "--kv-cache-memory", "--null-model", "--on-gateway-loss", "--log-level", "--log-json"):
        assert option in result.stdout, option
    assert "--max-num-seqs" not in result.stdout  # a gateway setting
