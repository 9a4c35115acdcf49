"""Shared fixtures. The real test model lives in ../shared beside the project root: tests that need
it skip with the reason when it is absent, except under CI, where its absence is a failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. This must be decided before anything
# imports triton, which reads the variable once: any test module may be the first to import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paged.shared.kv_store_path import SHM_DIR
from paged.shared.logging import configure_logging

# structlog's unconfigured default renders exceptions with rich, frame locals included: seconds per
# logged error. Tests get the same plain renderer a terminal user gets.
configure_logging("info", json=False)

STORIES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """Path to the stories260K Hugging Face checkpoint."""
    if not (STORIES_DIR / "config.json").is_file():
        message = f"test model not found at {STORIES_DIR} (../shared/models/stories260K beside the project root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return STORIES_DIR


@pytest.fixture
def store_name() -> Iterator[str]:
    """A fresh host KV store name; every file in /dev/shm named after it (the arena, a draft, a
    lease's lock, NAME-suffixed stores of the test) is removed after the test."""
    name = f"paged-test-{uuid.uuid4().hex[:12]}"
    yield name
    for leftover in SHM_DIR.glob(f"*{name}*"):
        leftover.unlink(missing_ok=True)
