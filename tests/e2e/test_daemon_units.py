"""The systemd units pass `systemd-analyze verify` (systemd/verify-units); CI installs systemd,
elsewhere the test skips without it. Plus the properties the daemon's behaviour relies on."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.daemon_process import PROJECT_ROOT

UNITS = PROJECT_ROOT / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_units_pass_systemd_analyze_verify() -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing: .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    pagedd = Path(sys.executable).parent / "pagedd"
    result = subprocess.run([UNITS / "verify-units", pagedd], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_unit_notifies_watches_and_reloads() -> None:
    service = _unit("paged-gateway.service")["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"]
    assert service["Restart"] == "on-failure"
    assert "-HUP" in service["ExecReload"]
    assert "--log-json" in service["ExecStart"] and "--config /etc/paged/paged.toml" in service["ExecStart"]
    assert service["RuntimeDirectory"] == "paged"


def test_worker_unit_is_one_per_gpu_and_ready_before_the_gateway() -> None:
    worker = _unit("paged-worker@.service")
    assert worker["Service"]["Type"] == "notify"
    assert "CUDA_VISIBLE_DEVICES=%i" in (UNITS / "paged-worker@.service").read_text()
    assert worker["Unit"]["PartOf"] == "paged-gateway.service"
    assert worker["Unit"]["Before"] == "paged-gateway.service"  # the gateway's READY waits for the workers

