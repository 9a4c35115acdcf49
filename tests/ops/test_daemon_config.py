"""The TOML configuration file: `pagedd --check-config FILE` and `pagedd --config FILE <command>`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from paged.ops.pagedd import main
from paged.shared.config_file import ConfigFileError, read_config_file
from support.daemon_process import PROJECT_ROOT, pagedd_command

EXAMPLE = PROJECT_ROOT / "systemd" / "paged.toml"


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pagedd_command("--check-config", str(path)), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_check_config_accepts_the_example_file() -> None:
    result = _check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE}: ok"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "8000"\n', "port: expected `int`, got `str`"),
        ("[serve]\nprot = 8000\n", "serve.prot: unknown key (not an option of pagedd serve)"),
        ("max_num_seq = 8\n", "max_num_seq: unknown key (not an option of any pagedd command)"),
        ('[worker]\nkv_cache_memory = "lots"\n', "worker.kv_cache_memory: 'lots' is not a size like 268435456, 256MiB or 4GiB"),
        ('scheduling_policy = "fifo"\n', "scheduling_policy: invalid enum value 'fifo'"),
        ("[gateway]\nendpoints = 'ipc:///run/paged/worker-0.sock'\n", "gateway.endpoints: expected `array`, got `str`"),
        ("[serve\n", "not valid TOML"),
    ],
)
def test_check_config_rejects_a_bad_file_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "paged.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["--check-config", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {path}: ")
    assert message in result.stderr


def test_command_tables_win_over_the_top_level(tmp_path: Path) -> None:
    path = tmp_path / "paged.toml"
    path.write_text('log_level = "debug"\nport = 9000\nmax_num_seqs = 8\nkv_cache_memory = "64MiB"\n[serve]\nport = 9001\n')
    default_map = read_config_file(path, main)
    assert default_map["log_level"] == "debug"
    assert default_map["serve"]["port"] == 9001
    assert default_map["gateway"]["port"] == 9000
    assert default_map["worker"]["kv_cache_memory"] == "64MiB"
    assert "port" not in default_map["worker"]  # only the commands that have the option get it
    assert default_map["serve"]["max_num_seqs"] == default_map["gateway"]["max_num_seqs"] == 8


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="file not found"):
        read_config_file(tmp_path / "absent.toml", main)


def test_config_file_sets_option_defaults_and_flags_override(tmp_path: Path) -> None:
    """The file fills click's default_map (shown as the defaults in --help); flags still win."""
    path = tmp_path / "paged.toml"
    path.write_text("[serve]\nport = 9123\nmax_num_seqs = 7\n")
    result = subprocess.run(pagedd_command("--config", str(path), "serve", "--help"), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[default: 9123]" in result.stdout
    assert "[default: 7]" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("port = true\n")
    result = subprocess.run(pagedd_command("--config", str(bad), "serve"), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {bad}: port: expected `int`, got `bool`"


def test_the_http_limits_are_options_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "paged.toml"
    path.write_text('header_timeout = 2.5\nmax_body_size = "1MiB"\n[gateway]\nmax_connections = 64\n')
    default_map = read_config_file(path, main)
    assert default_map["serve"]["header_timeout"] == default_map["gateway"]["header_timeout"] == 2.5
    assert default_map["gateway"]["max_connections"] == 64 and "max_connections" not in default_map["worker"]
    path.write_text("max_request_choices = 0\n")
    result = CliRunner().invoke(main, ["--config", str(path), "serve", "--null-model"])
    assert result.exit_code == 2 and "max_request_choices must be positive" in result.output


def test_workers_layout_is_a_key_checked_like_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "paged.toml"
    path.write_text('[gateway]\nendpoints = ["ipc:///a", "ipc:///b"]\nworkers_layout = "1p1d"\n[serve]\nworkers_layout = "2"\n')
    default_map = read_config_file(path, main)
    assert default_map["gateway"]["workers_layout"] == "1p1d" and default_map["serve"]["workers_layout"] == "2"
    path.write_text('[serve]\nworkers_layout = "1p1x"\n')
    result = CliRunner().invoke(main, ["--check-config", str(path)])
    assert result.exit_code == 1 and "serve.workers_layout" in result.stderr and "not a workers layout" in result.stderr
