"""The host's KV store tier: one shared-memory arena of fixed-size slots, each holding one page (one
block's K and V for every layer), attached by name by every worker on the host.

The gateway owns the store's index (which block hash lives in which slot) and its eviction policy; a
worker only executes the step items "save device block b into slot s" and "load slot s into device
block b" (StepInput.store_saves / store_loads, see docs/kv-store.md). Because every worker of the host
maps the same memory, a prefix one worker computed and saved is a hit for another.

The arena is a file in /dev/shm (POSIX shared memory): a 4 KiB header, then the slots in the page
pool's own layout, [num_layers, 2, num_slots, block_size, num_kv_heads, head_dim], so that a save or a
load is the same indexed copy as a swap (KVCache.save / KVCache.load). The header names the page
layout; a worker whose pages differ (another model, dtype or block size) refuses to attach.

Creation is atomic: the arena is built and its header written under a private name, then linked into
place, so an attaching worker never sees a half-written header, and of two workers creating it at
once one wins and the other attaches. The arena outlives the workers (a restarted worker finds it
again); `unlink` removes the name, and the memory goes once the last worker has closed it.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from pathlib import Path

import torch

from paged.shared.kv_store_path import SHM_DIR, draft_prefix, store_path
from paged.shared.logging import get_logger

log = get_logger("worker.kv_store")

__all__ = ["SHM_DIR", "KVStoreArena", "KVStoreError"]
HEADER_BYTES = 4096  # one page: the slots start page-aligned
MAGIC = b"PAGEDKV1"  # format version included: a future layout gets a new magic


class KVStoreError(ValueError):
    """The store cannot be created or attached (bad size, name, or another page layout)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVStoreArena:
    """A mapped arena. `pages` is the slots tensor, shared with every process that attached it."""

    def __init__(self, path: Path, mapping: mmap.mmap, header: dict, created: bool) -> None:
        self.path = path
        self.store_id: str = header["store_id"]
        self.num_slots: int = header["num_slots"]
        self.created = created
        self._mapping = mapping
        dtype = getattr(torch, header["dtype"])
        layers, kv, *page = header["page_shape"]
        count = layers * kv * self.num_slots * int(torch.Size(page).numel())
        flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=HEADER_BYTES)
        self.pages = flat.view(layers, kv, self.num_slots, *page)

    @classmethod
    def open(cls, name: str, size: int, page_shape: tuple[int, ...], dtype: torch.dtype) -> KVStoreArena:
        """Attach the store `name`, creating it with `size` bytes of slots if it does not exist.

        page_shape is one page's [num_layers, 2, block_size, num_kv_heads, head_dim]."""
        try:
            return cls.create(name, size, page_shape, dtype)
        except FileExistsError:
            return cls.attach(name, page_shape, dtype)

    @classmethod
    def create(cls, name: str, size: int, page_shape: tuple[int, ...], dtype: torch.dtype) -> KVStoreArena:
        """Create the store; FileExistsError if a store of that name exists."""
        path = _path(name)
        page_bytes = int(torch.Size(page_shape).numel()) * torch.empty((), dtype=dtype).element_size()
        num_slots = size // page_bytes
        if num_slots < 1:
            raise KVStoreError(f"a KV store of {size} bytes holds no page of {page_bytes} bytes")
        header = {
            "store_id": uuid.uuid4().hex,
            "num_slots": num_slots,
            "dtype": _dtype_name(dtype),
            "page_shape": list(page_shape),
        }
        encoded = json.dumps(header).encode()
        if len(MAGIC) + 4 + len(encoded) > HEADER_BYTES:
            raise KVStoreError("KV store header too long")
        draft = path.with_name(f"{draft_prefix(name)}{os.getpid()}.{header['store_id']}")
        fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # tmpfs allocates pages on first write: the size costs nothing until slots are saved.
            os.ftruncate(fd, HEADER_BYTES + num_slots * page_bytes)
            os.pwrite(fd, MAGIC + len(encoded).to_bytes(4, "little") + encoded, 0)
            os.link(draft, path)  # atomic; FileExistsError if another worker created it first
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
            draft.unlink()
        log.info("kv_store_created", path=str(path), store_id=header["store_id"], num_slots=num_slots, bytes=size)
        return cls(path, mapping, header, created=True)

    @classmethod
    def attach(cls, name: str, page_shape: tuple[int, ...], dtype: torch.dtype) -> KVStoreArena:
        """Attach an existing store, checking that its pages are laid out like this worker's."""
        path = _path(name)
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, HEADER_BYTES, 0)
            if head[: len(MAGIC)] != MAGIC:
                raise KVStoreError(f"{path} is not a paged KV store (or one of another format)")
            length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 4], "little")
            header = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
            theirs = f"{header['dtype']}{header['page_shape']}"
            ours = f"{_dtype_name(dtype)}{list(page_shape)}"
            if theirs != ours:
                raise KVStoreError(f"KV store {path} holds pages of {theirs}, this worker's are {ours}")
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        log.info("kv_store_attached", path=str(path), store_id=header["store_id"], num_slots=header["num_slots"])
        return cls(path, mapping, header, created=False)

    def close(self) -> None:
        """Unmap this process's view (the store itself stays). The pages tensor must not be used after."""
        del self.pages
        try:
            self._mapping.close()
        except BufferError:  # a view of `pages` is still alive somewhere: the mapping goes with it
            pass

    def unlink(self) -> None:
        """Remove the store's name: no worker can attach it any more; attached ones keep their mapping."""
        self.path.unlink(missing_ok=True)


def _path(name: str) -> Path:
    try:
        return store_path(name)
    except ValueError as exc:
        raise KVStoreError(str(exc)) from None

