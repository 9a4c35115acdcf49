"""Build the worker's C++ kernels at first use and cache the shared library.

Nothing is compiled at `pip install` time (build isolation would pull a multi-GB CUDA torch for a torch
extension): the sources ship as package data and are compiled on the machine that runs them, with the
system C++ compiler and -march=native, into a cache directory. The library is a plain C ABI loaded with
ctypes, so no torch headers and no ninja are involved; a build takes under a second (the attention
kernel, with its unrolled variants: about 2 s).

- Cache directory: $PAGED_KERNEL_CACHE_DIR, else $XDG_CACHE_HOME/paged/kernels, else ~/.cache/paged/kernels
  (the systemd units point it into the service's CacheDirectory, as they do for Triton's cache).
- The file name carries a hash of everything the binary depends on (source, the headers beside it,
  compiler and its version, flags, the CPU that -march=native targets), so a later start loads it without
  compiling, and an edited source, a new compiler or another CPU model gets a build of its own.
- Several workers may start at once: each compiles to a private temporary file and renames it into place
  (atomic on POSIX); they all produce the same library, so whichever rename lands last is as good.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from paged.shared.logging import get_logger

log = get_logger("native")

CACHE_DIR_ENV = "PAGED_KERNEL_CACHE_DIR"
COMPILER_ENV = "CXX"
COMPILE_TIMEOUT_S = 300
# -fno-math-errno lets the compiler inline and vectorize math calls; no -ffast-math: the kernels rely on
# IEEE infinities for masking and on the order of their sums.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# Tried first; a compiler without OpenMP support gets a single-threaded build (the pragmas are ignored).
OPENMP_FLAGS = ("-fopenmp",)


class NativeBuildError(RuntimeError):
    """No usable compiler, or the source did not compile."""


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paged" / "kernels"


def find_compiler() -> str | None:
    """$CXX if set (even if it does not exist: an explicit choice is not second-guessed), else the first
    C++ compiler on PATH."""
    explicit = os.environ.get(COMPILER_ENV)
    if explicit:
        return explicit
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C++ compiler {compiler!r} is not usable: {exc}") from None
    return result.stdout


def _compile(compiler: str, source: Path, target: Path, flags: tuple[str, ...]) -> None:
    """Compile to a private file next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *flags, str(source), "-o", temporary]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise NativeBuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"compiling {source.name} failed: {exc}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_library(source: Path) -> ctypes.CDLL:
    """The shared library built from `source`, compiled now if no cached build matches. Raises
    NativeBuildError when there is no compiler or the build fails."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    identity = hashlib.sha256()
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, compiler.encode(), _compiler_version(compiler).encode(),
                 " ".join(FLAGS + OPENMP_FLAGS).encode(), _cpu_identity().encode()):
        identity.update(part)
        identity.update(b"\0")
    target = cache_dir() / f"{source.stem}-{identity.hexdigest()[:20]}.so"
    if not target.exists():
        started = time.perf_counter()
        try:
            _compile(compiler, source, target, FLAGS + OPENMP_FLAGS)
            openmp = True
        except NativeBuildError:
            _compile(compiler, source, target, FLAGS)
            openmp = False
        log.info("native_kernel_built", source=source.name, library=str(target), openmp=openmp,
                 seconds=round(time.perf_counter() - started, 2))
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeBuildError(f"loading {target} failed: {exc}") from None
