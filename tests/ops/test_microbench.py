"""The worker micro-benchmark (ops/microbench.py) runs end to end on the built-in model and prints every
table, including a baseline kernel timed beside this one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from paged.ops.microbench import main
from paged.worker.attention import cpu_ops
from paged.worker.native.compiler import NativeBuildError


def test_prints_every_table_with_a_baseline_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        cpu_ops.load()
    except NativeBuildError as exc:  # pragma: no cover - machines with a compiler run this test
        pytest.skip(f"the native kernels cannot be built here: {exc}")
    monkeypatch.setattr("paged.ops.microbench.DEFAULT_MODEL", Path("/nonexistent"))  # the built-in model
    args = ["--batch-sizes", "1,3", "--prompt-len", "8", "--decode-steps", "2", "--repeats", "1", "--contexts", "40",
            "--attn-batch", "3", "--attn-heads", "4,2", "--attn-head-dim", "16", "--attn-repeats", "2",
            "--shared-prefix", "32", "--own-tokens", "5", "--prefill-chunks", "2", "--chunk-len", "7",
            "--baseline-kernel", str(cpu_ops.SOURCE)]  # fmt: skip
    result = CliRunner().invoke(main, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    for title in ("decode attention", "shared prefix", "decoder projections"):
        assert title in result.output
    assert "cpu (baseline)" in result.output and "decode 3 x (shared + 5)" in result.output
