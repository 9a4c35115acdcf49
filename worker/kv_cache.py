"""The KV page pool: one preallocated tensor per device holding every layer's K and V pages, plus a
host-side pool that swapped-out pages live in (the host's shared KV store, worker/kv_store.py, is
saved to and loaded from the same way).

Layout: `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, index 0 of dim 1 being K
and 1 being V. Each layer's K and V caches handed to the model are views `[num_blocks, block_size,
num_kv_heads, head_dim]` of it (contiguous, so the attention ops may view them as `[slots, H, D]`).
One tensor rather than 2 * num_layers lets a copy or swap of a list of blocks touch every layer in a
single indexed operation along dim 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from paged.shared.protocol import BlockCopy
from paged.worker.model_config import ModelArch

BLOCK_DIM = 2  # the dimension of the pool tensors that indexes blocks


def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * element_size


def num_blocks_for_budget(budget_bytes: int, arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """How many pages fit in `budget_bytes` (never negative)."""
    return max(0, budget_bytes // bytes_per_block(arch, block_size, dtype))


def cuda_kv_cache_budget(device: torch.device, gpu_memory_utilization: float, profile_forward: Callable[[], None]) -> int:
    """Bytes left for KV pages on a CUDA device once weights and the peak activations are accounted for.

    `profile_forward` runs a dummy forward pass at the largest batch the worker will be given; the peak
    torch allocation it reaches (weights included) is what the pages must leave room for, as vLLM does.
    Memory held outside torch's allocator (CUDA context, other processes) is subtracted as well.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_forward()
    torch.cuda.synchronize(device)
    peak_torch = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return int(total * gpu_memory_utilization) - peak_torch - outside_torch


def _pool_shape(arch: ModelArch, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)


def _block_indices(
    copies: Sequence[BlockCopy], src_device: torch.device, dst_device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.tensor([c.src for c in copies], dtype=torch.long, device=src_device)
    dst = torch.tensor([c.dst for c in copies], dtype=torch.long, device=dst_device)
    return src, dst


def _copy_each(dst_pages: torch.Tensor, src_pages: torch.Tensor, copies: Sequence[BlockCopy]) -> None:
    """Page copy.src of src_pages -> page copy.dst of dst_pages, one strided copy per page, between
    two distinct CPU tensors. On the CPU this is 2-3x faster than gathering the pages into a
    temporary and scattering that (measured with python -m paged.ops.kv_tier_bench)."""
    for copy in copies:
        dst_pages[:, :, copy.dst].copy_(src_pages[:, :, copy.src])


class KVCache:
    """The device page pool and its host-side swap pool."""

    def __init__(
        self,
        arch: ModelArch,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.block_size = block_size
        self.device = device
        # Zeroed, not empty: attention reads padding slots through masked-out positions, and a NaN
        # there would still poison the output (0 * NaN).
        self.device_pool = torch.zeros(_pool_shape(arch, num_blocks, block_size), dtype=dtype, device=device)
        # Host pages are only read after a swap-out wrote them, so they need no initialisation. Pinned
        # memory makes device<->host copies DMA transfers.
        self.host_pool = torch.empty(
            _pool_shape(arch, num_host_blocks, block_size),
            dtype=dtype,
            pin_memory=device.type == "cuda" and num_host_blocks > 0,
        )
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [(layer[0], layer[1]) for layer in self.device_pool]

    def copy_blocks(self, copies: Sequence[BlockCopy]) -> None:
        """Device -> device page copies (copy-on-write). All sources are read before any destination is written."""
        if not copies:
            return
        self._check(copies, self.num_blocks, self.num_blocks, "copy")
        src, dst = _block_indices(copies, self.device, self.device)
        self.device_pool.index_copy_(BLOCK_DIM, dst, self.device_pool.index_select(BLOCK_DIM, src))

    def swap_out(self, copies: Sequence[BlockCopy]) -> None:
        """Device page `src` -> host page `dst`, for every layer."""
        self.save(self.host_pool, copies, "swap-out")

    def swap_in(self, copies: Sequence[BlockCopy]) -> None:
        """Host page `src` -> device page `dst`, for every layer."""
        self.load(self.host_pool, copies, "swap-in")

    def save(self, host_pages: torch.Tensor, copies: Sequence[BlockCopy], what: str) -> None:
        """Device page `src` -> page `dst` of `host_pages` (the swap pool, or the KV store's slots:
        any CPU tensor in the pool's layout)."""
        if not copies:
            return
        self._check(copies, self.num_blocks, host_pages.shape[BLOCK_DIM], what)
        if self.device.type == "cpu":
            _copy_each(host_pages, self.device_pool, copies)
            return
        src, dst = _block_indices(copies, self.device, torch.device("cpu"))
        host_pages.index_copy_(BLOCK_DIM, dst, self.device_pool.index_select(BLOCK_DIM, src).cpu())

    def load(self, host_pages: torch.Tensor, copies: Sequence[BlockCopy], what: str) -> None:
        """Page `src` of `host_pages` -> device page `dst`, for every layer."""
        if not copies:
            return
        self._check(copies, host_pages.shape[BLOCK_DIM], self.num_blocks, what)
        if self.device.type == "cpu":
            _copy_each(self.device_pool, host_pages, copies)
            return
        src, dst = _block_indices(copies, torch.device("cpu"), self.device)
        pages = host_pages.index_select(BLOCK_DIM, src).pin_memory()
        self.device_pool.index_copy_(BLOCK_DIM, dst, pages.to(self.device, non_blocking=True))

    # One page at a time, as bytes: what a KV transport streams between workers.

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page: [num_layers, 2, block_size, num_kv_heads, head_dim]."""
        return tuple(self.device_pool[:, :, 0].shape)

    @property
    def page_layout(self) -> str:
        """The dtype and shape of one page, e.g. "float32[5, 2, 16, 4, 8]": two pools can exchange
        pages only if theirs are equal."""
        return f"{str(self.device_pool.dtype).removeprefix('torch.')}{list(self.page_shape)}"

    @property
    def page_nbytes(self) -> int:
        return self.device_pool[:, :, 0].nbytes

    def read_page(self, block: int) -> torch.Tensor:
        """A copy of device page `block` (every layer, K and V) as contiguous bytes on the CPU."""
        return self.device_pool[:, :, block].contiguous().cpu().view(torch.uint8).reshape(-1)

    def write_page(self, block: int, data: torch.Tensor) -> None:
        """Overwrite device page `block` with bytes read_page produced (on any pool of the same layout)."""
        page = self.device_pool[:, :, block]
        page.copy_(data.view(page.dtype).view(page.shape))

    @staticmethod
    def _check(copies: Sequence[BlockCopy], num_src: int, num_dst: int, what: str) -> None:
        """Reject out-of-range ids with a message naming them (index_copy_ would not say which)."""
        for copy in copies:
            if not (0 <= copy.src < num_src and 0 <= copy.dst < num_dst):
                raise IndexError(
                    f"{what} {copy.src}->{copy.dst} out of range: {num_src} source and {num_dst} destination blocks"
                )
