"""KV tier micro-benchmark: worker-to-worker page transfers over the ZeroMQ transport, and saves and
loads between a page pool and the host's shared-memory KV store. Prints numbers; asserts nothing.

Two page sizes (block size 16): the test model's (stories260K: 5 layers, 4 KV heads of 8, float32:
20 KiB a page) and an 8B-class model's (32 layers, 8 KV heads of 128, bfloat16: 2 MiB a page).

Transfers: a receiver process (its own interpreter, as a decode worker is) takes --blocks pages per
transfer into its pool; the sender's clock runs from send() until the receiver's Done, so a figure
includes every page read out of one pool, carried, and written into the other. Store: one page saved
(loaded) alone, and --blocks pages in one step; the median over --repeats, per page.

    python -m paged.ops.kv_tier_bench [--blocks 94] [--repeats 10] [--transport ipc|tcp]
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from paged.shared.logging import configure_logging
from paged.shared.protocol import BlockCopy
from paged.worker.builtin_model import BUILTIN_ARCH
from paged.worker.kv_cache import KVCache
from paged.worker.kv_store import KVStoreArena
from paged.worker.model_config import ModelArch
from paged.worker.zmq_transport import ZmqTransport

BLOCK_SIZE = 16
TIMEOUT_S = 30.0
PAGES: dict[str, tuple[ModelArch, torch.dtype]] = {
    "stories260K": (dataclasses.replace(BUILTIN_ARCH, num_layers=5, num_kv_heads=4, head_dim=8), torch.float32),
    "8B-class": (dataclasses.replace(BUILTIN_ARCH, num_layers=32, num_kv_heads=8, head_dim=128), torch.bfloat16),
}


def _pool(arch: ModelArch, dtype: torch.dtype, num_blocks: int) -> KVCache:
    cache = KVCache(arch, num_blocks, BLOCK_SIZE, dtype, torch.device("cpu"))
    cache.device_pool.copy_(torch.randn(cache.device_pool.shape))
    return cache


def _receiver(arch: ModelArch, dtype: torch.dtype, num_blocks: int, endpoint: str, conn: Connection) -> None:
    """The receiving worker: registers each transfer it is told of, and says how it ended."""
    configure_logging("warning")
    torch.set_num_threads(1)
    transport = ZmqTransport(_pool(arch, dtype, num_blocks), endpoint, TIMEOUT_S)
    conn.send(transport.endpoint)
    while (request := conn.recv()) is not None:
        transfer_id, blocks = request
        transport.receive(transfer_id, blocks)
        conn.send("registered")
        done, failed = _outcome(transport)
        conn.send(bool(done) and not failed)
    transport.close()


def _outcome(transport: ZmqTransport) -> tuple[list[int], list]:
    while True:
        transport.wait_finished(1.0)
        done, failed = transport.take_finished()
        if done or failed:
            return done, failed


def measure_transfers(name: str, endpoint: str, num_blocks: int, repeats: int) -> tuple[float, int]:
    """(median seconds per transfer of num_blocks pages, page bytes)."""
    arch, dtype = PAGES[name]
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_receiver, args=(arch, dtype, num_blocks, endpoint.replace("NAME", "rx"), theirs))
    process.start()
    cache = _pool(arch, dtype, num_blocks)
    sender = ZmqTransport(cache, endpoint.replace("NAME", "tx"), TIMEOUT_S)
    peer = ours.recv()
    blocks = list(range(num_blocks))
    times = []
    try:
        for transfer_id in range(repeats + 1):  # the first warms up (connection, page faults)
            ours.send((transfer_id, blocks))
            ours.recv()
            started = time.perf_counter()
            sender.send(transfer_id, peer, blocks)
            done, failed = _outcome(sender)
            elapsed = time.perf_counter() - started
            if not ours.recv() or failed:
                raise RuntimeError(f"transfer {transfer_id} failed: {failed}")
            if transfer_id:
                times.append(elapsed)
    finally:
        ours.send(None)
        process.join(10)
        sender.close()
    return statistics.median(times), cache.page_nbytes


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_store(name: str, num_blocks: int, repeats: int) -> dict[str, float]:
    """Median seconds per page: save and load, one page alone and num_blocks pages in one step."""
    arch, dtype = PAGES[name]
    cache = _pool(arch, dtype, num_blocks)
    store = KVStoreArena.open(f"paged-bench-{uuid.uuid4().hex[:8]}", num_blocks * cache.page_nbytes, cache.page_shape, dtype)
    one = [BlockCopy(num_blocks // 2, num_blocks // 3)]
    many = [BlockCopy(block, (block * 7) % num_blocks) for block in range(num_blocks)]  # scattered slots
    try:
        return {
            "save 1": median_s(lambda: cache.save(store.pages, one, "save"), repeats),
            "load 1": median_s(lambda: cache.load(store.pages, one, "load"), repeats),
            f"save {num_blocks}": median_s(lambda: cache.save(store.pages, many, "save"), repeats) / num_blocks,
            f"load {num_blocks}": median_s(lambda: cache.load(store.pages, many, "load"), repeats) / num_blocks,
        }
    finally:
        store.close()
        store.unlink()


@click.command()
@click.option("--blocks", default=94, show_default=True, help="pages per transfer (94 pages of 16 tokens: a 1500-token prompt)")
@click.option("--repeats", default=10, show_default=True)
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default="ipc", show_default=True)
@click.option("--pages", "page_names", default=",".join(PAGES), show_default=True, help="page sizes to measure")
def main(blocks: int, repeats: int, transport: str, page_names: str) -> None:
    configure_logging("warning")
    torch.set_num_threads(1)
    console = Console()
    names = page_names.split(",")
    with tempfile.TemporaryDirectory(prefix="kvb") as directory:
        endpoint = f"ipc://{Path(directory) / 'NAME'}" if transport == "ipc" else "tcp://127.0.0.1:*"
        transfers = {name: measure_transfers(name, endpoint, blocks, repeats) for name in names}
    stores = {name: measure_store(name, blocks, repeats) for name in names}

    table = Table(title=f"KV page transfers over {transport}, {blocks} pages each (sender's send() to receiver's Done)")
    for column in ("page", "KiB / page", "ms / transfer", "MB/s", "pages/s"):
        table.add_column(column, justify="right")
    for name, (seconds, page_bytes) in transfers.items():
        table.add_row(name, f"{page_bytes / 1024:.0f}", f"{seconds * 1e3:.2f}", f"{blocks * page_bytes / seconds / 1e6:.0f}", f"{blocks / seconds:.0f}")
    console.print(table)
    table = Table(title="KV store (shared memory): µs per page (median)")
    table.add_column("page", justify="right")
    for column in stores[names[0]]:
        table.add_column(column, justify="right")
    for name, row in stores.items():
        table.add_row(name, *(f"{seconds * 1e6:.1f}" for seconds in row.values()))
    console.print(table)


if __name__ == "__main__":
    main()
