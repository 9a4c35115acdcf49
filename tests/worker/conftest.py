"""Fixtures shared by the worker tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """These models are tiny: torch's thread pool only adds contention on a shared 2-core machine (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short directory for ipc:// sockets (a socket path must fit in about 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kv"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
