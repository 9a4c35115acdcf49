"""Building the native kernels at first use: the cache directory, reuse of a cached build, several
processes building at once, and the fallback to the torch attention path when no compiler works."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import structlog

from paged.worker.attention import backend, cpu_ops, torch_ops
from paged.worker.native import compiler
from paged.worker.native.compiler import NativeBuildError, load_library

SOURCE = 'extern "C" int answer() { return %d; }\n'


@pytest.fixture
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "kernels"
    monkeypatch.setenv(compiler.CACHE_DIR_ENV, str(cache))
    return cache


def write_source(directory: Path, value: int) -> Path:
    source = directory / "answer.cpp"
    source.write_text(SOURCE % value)
    return source


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiler.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiler.cache_dir() == tmp_path / "xdg" / "paged" / "kernels"
    monkeypatch.setenv(compiler.CACHE_DIR_ENV, str(tmp_path / "explicit"))
    assert compiler.cache_dir() == tmp_path / "explicit"


def test_a_cached_build_is_loaded_without_compiling(tmp_path: Path, kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_source(tmp_path, 42)
    assert load_library(source).answer() == 42
    [built] = kernel_cache.glob("answer-*.so")

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled again although a matching build is cached")

    monkeypatch.setattr(compiler, "_compile", no_compiling)
    assert load_library(source).answer() == 42
    assert list(kernel_cache.iterdir()) == [built]


def test_an_edited_source_gets_a_build_of_its_own(tmp_path: Path, kernel_cache: Path) -> None:
    assert load_library(write_source(tmp_path, 1)).answer() == 1
    assert load_library(write_source(tmp_path, 2)).answer() == 2
    assert len(list(kernel_cache.glob("answer-*.so"))) == 2


def _build_and_call(source: str) -> int:
    return load_library(Path(source)).answer()


def test_processes_building_at_once_all_get_a_working_library(tmp_path: Path, kernel_cache: Path) -> None:
    source = write_source(tmp_path, 7)
    # spawn: fresh interpreters that inherit the cache directory through the environment, as workers do.
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_build_and_call, [str(source)] * 4) == [7] * 4
    # One library, and no temporary file left behind by the builds that lost the race.
    assert [path.suffix for path in kernel_cache.iterdir()] == [".so"]


def test_a_compile_error_is_reported(tmp_path: Path, kernel_cache: Path) -> None:
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    with pytest.raises(NativeBuildError, match="failed"):
        load_library(source)
    assert not any(kernel_cache.iterdir())


def test_without_a_compiler_attention_falls_back_to_torch_with_one_warning(
    tmp_path: Path, kernel_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(compiler.COMPILER_ENV, str(tmp_path / "no-such-compiler"))
    cpu_ops.load.cache_clear()
    try:
        with pytest.raises(NativeBuildError, match="not usable"):
            load_library(write_source(tmp_path, 3))
        with structlog.testing.capture_logs() as logs:
            ops = backend.get_attention_ops("cpu")
    finally:
        cpu_ops.load.cache_clear()  # later tests build (or find) the real library again
    assert ops is torch_ops
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["native_attention_unavailable"]
    assert warnings[0]["fallback"] == "torch" and "no-such-compiler" in warnings[0]["reason"]
