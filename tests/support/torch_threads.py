"""Run a computation under a given torch thread count (the native CPU kernels take theirs from it)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def with_threads(count: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute() with torch.set_num_threads(count), the previous count restored afterwards."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(count)
        return compute()
    finally:
        torch.set_num_threads(threads)
