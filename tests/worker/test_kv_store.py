"""The host's shared-memory KV store: pages saved into slots come back bit for bit, another process
attached by name sees (and writes) the same slots, only workers with the same page layout attach, and
a prefix loaded from the store gives the logits of recomputing it, on the worker that saved it or on
another one."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from paged.shared.config import CacheConfig, KVSharingConfig, MiB, ModelConfig
from paged.shared.protocol import BlockCopy, NewSequence, ScheduledSeq, StepInput
from paged.worker.builtin_model import BUILTIN_ARCH
from paged.worker.kv_cache import KVCache
from paged.worker.kv_store import SHM_DIR, KVStoreArena, KVStoreError
from paged.worker.worker import Worker
from support.worker_steps import GREEDY

ARCH = dataclasses.replace(BUILTIN_ARCH, num_layers=3, num_kv_heads=2, head_dim=4)
NUM_BLOCKS, BLOCK_SIZE, NUM_SLOTS = 24, 4, 10
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def random_cache(seed: int = 0) -> KVCache:
    cache = KVCache(ARCH, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    cache.device_pool.copy_(torch.randn(cache.device_pool.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def open_store(name: str, cache: KVCache, num_slots: int = NUM_SLOTS) -> KVStoreArena:
    return KVStoreArena.open(name, num_slots * cache.page_nbytes, cache.page_shape, cache.device_pool.dtype)


def test_save_then_load_restores_pages(store_name: str) -> None:
    cache = random_cache()
    store = open_store(store_name, cache)
    blocks, slots, back = [3, 17, 0, 9], [9, 0, 4, 5], [22, 1, 3, 10]  # unordered, non-contiguous
    original = cache.device_pool[:, :, blocks].clone()
    cache.save(store.pages, [BlockCopy(b, s) for b, s in zip(blocks, slots)], "store save")
    cache.device_pool.normal_()  # the blocks are reused while their content waits in the store
    others = [b for b in range(NUM_BLOCKS) if b not in back]
    others_before = cache.device_pool[:, :, others].clone()
    cache.load(store.pages, [BlockCopy(s, b) for s, b in zip(slots, back)], "store load")
    assert torch.equal(cache.device_pool[:, :, back], original)
    assert torch.equal(cache.device_pool[:, :, others], others_before)
    store.close()


def test_out_of_range_slots_are_refused_with_their_ids(store_name: str) -> None:
    cache = random_cache()
    store = open_store(store_name, cache)
    with pytest.raises(IndexError, match=f"store save 0->{NUM_SLOTS} out of range"):
        cache.save(store.pages, [BlockCopy(0, NUM_SLOTS)], "store save")
    with pytest.raises(IndexError, match=f"store load {NUM_SLOTS}->0 out of range"):
        cache.load(store.pages, [BlockCopy(NUM_SLOTS, 0)], "store load")
    store.close()


_CHILD = """
import sys, torch
from paged.worker.kv_store import KVStoreArena
name, shape, seed, read_slots, write_slots = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4]), eval(sys.argv[5])
store = KVStoreArena.attach(name, tuple(shape), torch.float32)
expected = torch.randn(store.pages.shape, generator=torch.Generator().manual_seed(seed))
assert torch.equal(store.pages[:, :, read_slots], expected[:, :, read_slots]), "the parent's saves are not visible"
store.pages[:, :, write_slots] = -expected[:, :, write_slots]
print(store.store_id)
"""


def test_a_second_process_attached_by_name_sees_and_writes_the_same_slots(store_name: str) -> None:
    cache = random_cache()
    store = open_store(store_name, cache)
    assert store.created
    expected = torch.randn(store.pages.shape, generator=torch.Generator().manual_seed(5))
    cache.device_pool[:, :, :4] = expected[:, :, [2, 3, 7, 0]]
    cache.save(store.pages, [BlockCopy(0, 2), BlockCopy(1, 3), BlockCopy(2, 7), BlockCopy(3, 0)], "store save")
    args = [store_name, str(list(cache.page_shape)), "5", "[0, 2, 3, 7]", "[1, 9]"]
    child = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1] == store.store_id
    cache.load(store.pages, [BlockCopy(1, 10), BlockCopy(9, 11)], "store load")  # what the child wrote
    assert torch.equal(cache.device_pool[:, :, [10, 11]], -expected[:, :, [1, 9]])
    store.close()


def test_attach_checks_the_page_layout_and_open_attaches_an_existing_store(store_name: str) -> None:
    cache = random_cache()
    first = open_store(store_name, cache)
    second = open_store(store_name, cache, num_slots=3)  # exists already: its size wins
    assert (second.created, second.store_id, second.num_slots) == (False, first.store_id, NUM_SLOTS)
    other_shape = (ARCH.num_layers, 2, 2 * BLOCK_SIZE, ARCH.num_kv_heads, ARCH.head_dim)
    with pytest.raises(KVStoreError, match=r"holds pages of float32\[3, 2, 4, 2, 4\], this worker's are float32\[3, 2, 8, 2, 4\]"):
        KVStoreArena.attach(store_name, other_shape, torch.float32)
    with pytest.raises(KVStoreError, match="holds pages of float32"):
        KVStoreArena.attach(store_name, cache.page_shape, torch.bfloat16)
    for arena in (first, second):
        arena.close()
    first.unlink()
    with pytest.raises(FileNotFoundError):
        KVStoreArena.attach(store_name, cache.page_shape, torch.float32)


def test_bad_sizes_and_names_are_refused(store_name: str) -> None:
    cache = random_cache()
    with pytest.raises(KVStoreError, match="holds no page"):
        KVStoreArena.open(store_name, cache.page_nbytes - 1, cache.page_shape, torch.float32)
    assert not (SHM_DIR / store_name).exists()
    for name in ("", "a/b", ".hidden"):
        with pytest.raises(KVStoreError, match="bad KV store name"):
            KVStoreArena.open(name, 10 * cache.page_nbytes, cache.page_shape, torch.float32)
    (SHM_DIR / store_name).write_bytes(b"not a store at all")
    with pytest.raises(KVStoreError, match="is not a paged KV store"):
        KVStoreArena.open(store_name, 10 * cache.page_nbytes, cache.page_shape, torch.float32)


# --- Through the Worker, with the real model ---------------------------------------------------------

STORE_BLOCK_SIZE = 16
ATOL = 1e-4


@pytest.fixture
def store_workers(single_thread: None, stories_dir: Path, store_name: str) -> Iterator[tuple[Worker, Worker]]:
    """Two workers of one host: separate page pools, one KV store."""
    made = [
        Worker(
            ModelConfig(model=str(stories_dir), device="cpu", attention_backend="torch"),
            CacheConfig(block_size=STORE_BLOCK_SIZE, kv_cache_memory=2 * MiB, swap_space=0),
            max_num_batched_tokens=512,
            sharing=KVSharingConfig(kv_offload_memory=1 * MiB, kv_store_name=store_name),
        )
        for _ in range(2)
    ]
    yield made[0], made[1]
    for worker in made:
        worker.close()


def prompt_of(length: int, vocab_size: int) -> list[int]:
    return [1, *torch.randint(3, vocab_size, (length - 1,), generator=torch.Generator().manual_seed(11)).tolist()]


def test_a_prefix_loaded_from_the_store_gives_the_logits_of_recomputing(store_workers: tuple[Worker, Worker]) -> None:
    saver, loader = store_workers
    assert saver.kv_store_id == loader.kv_store_id != "" and saver.num_store_slots == loader.num_store_slots > 0
    prompt = prompt_of(90, saver.arch.vocab_size)  # five full blocks and a partial one
    num_cached = 5 * STORE_BLOCK_SIZE

    def logits_of(worker: Worker, step: StepInput) -> torch.Tensor:
        output, logits = worker.execute_step_with_logits(step)
        assert not output.errors, output.errors
        return logits[1]

    # Recomputing: the whole prompt in one step.
    recomputed = logits_of(loader, StepInput(0, new_seqs=[NewSequence(1, prompt, GREEDY)], scheduled=[ScheduledSeq(1, 0, 90, 0, list(range(6)))]))
    loader.execute_step(StepInput(1, freed_seq_ids=[1]))

    # The saver computes the prompt in blocks 10..15, finishes; then its five full blocks are evicted
    # for another sequence, and the same step saves them to slots 7, 3, 0, 12, 5 before they are overwritten.
    logits_of(saver, StepInput(0, new_seqs=[NewSequence(1, prompt, GREEDY)], scheduled=[ScheduledSeq(1, 0, 90, 0, list(range(10, 16)))]))
    slots = [7, 3, 0, 12, 5]
    saver.execute_step(
        StepInput(
            1,
            freed_seq_ids=[1],
            store_saves=[BlockCopy(block, slot) for block, slot in zip(range(10, 15), slots)],
            new_seqs=[NewSequence(2, list(range(3, 83)), GREEDY)],
            scheduled=[ScheduledSeq(2, 0, 80, 0, list(range(10, 15)))],
        )
    )

    for worker, blocks in ((loader, [20, 2, 31, 4, 17]), (saver, [30, 31, 32, 33, 34])):
        tail = blocks[-1] + 1
        step = StepInput(
            5,
            store_loads=[BlockCopy(slot, block) for slot, block in zip(slots, blocks)],
            new_seqs=[NewSequence(3, prompt, GREEDY)],
            scheduled=[ScheduledSeq(3, num_cached, 90 - num_cached, 0, [*blocks, tail])],  # only the last 10 tokens computed
        )
        output, logits = worker.execute_step_with_logits(step)
        assert not output.errors, output.errors
        assert output.store_load_s > 0 and output.store_save_s == 0
        torch.testing.assert_close(logits[3], recomputed, atol=ATOL, rtol=0)
