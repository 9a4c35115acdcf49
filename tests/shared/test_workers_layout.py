"""Workers layouts (`--workers-layout`): counts of prefill, decode and mixed workers, in order."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from paged.ops.pagedd import main as pagedd
from paged.shared.workers_layout import parse_workers_layout


@pytest.mark.parametrize(
    ("layout", "roles"),
    [
        ("2", ["mixed", "mixed"]),
        ("1p1d", ["prefill", "decode"]),
        ("2P1D", ["prefill", "prefill", "decode"]),
        ("1p1d1m", ["prefill", "decode", "mixed"]),
        ("3m", ["mixed"] * 3),
        (" 1d ", ["decode"]),
    ],
)
def test_layouts(layout: str, roles: list[str]) -> None:
    assert parse_workers_layout(layout) == roles


@pytest.mark.parametrize("layout", ["", "p", "1x", "p1", "1pd", "0", "0p0d", "1p-1d", "1p 1d"])
def test_what_is_not_a_layout_says_how_one_looks(layout: str) -> None:
    with pytest.raises(ValueError, match="layout"):
        parse_workers_layout(layout)


def test_the_commands_refuse_a_bad_layout_or_one_that_does_not_fit() -> None:
    runner = CliRunner()
    bad = runner.invoke(pagedd, ["serve", "--workers-layout", "1q"])
    assert bad.exit_code == 2 and "not a workers layout" in bad.output
    mismatch = runner.invoke(pagedd, ["serve", "--null-model", "--workers", "3", "--workers-layout", "1p1d"])
    assert mismatch.exit_code == 2 and "--workers 3 but the workers layout has 2 workers" in mismatch.output
    split = runner.invoke(pagedd, ["gateway", "--worker", "ipc:///tmp/a", "--workers-layout", "1p1d"])
    assert split.exit_code == 2 and "2 workers for 1 --worker endpoints" in split.output
