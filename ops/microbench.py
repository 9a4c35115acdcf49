"""Worker micro-benchmark: prefill and decode throughput through Worker.execute_step, paged decode
attention against plain SDPA over a dense cache, and on the CPU attention over a shared prefix and the
linear layers. Prints numbers; asserts nothing.

Throughput: B sequences of --prompt-len random tokens are prefilled in one step (best of --repeats),
then decoded greedily for --decode-steps steps. Attention: one decode token per sequence over
`context` cached tokens read through shuffled block tables (on the CPU the native kernel and the torch
reference path; Triton on CUDA) versus SDPA over [B, Hkv, context, D] tensors; the figure is the median
time and paged / dense. Shared prefix (CPU): --attn-batch decode rows whose tables start with the same
--shared-prefix tokens' blocks (what the prefix cache hands out) plus --own-tokens of their own, and
--prefill-chunks chunks of --chunk-len tokens over the same prefix; --baseline-kernel times another
version of paged_attention.cpp beside this one. Linear (CPU, float32): the model's decoder projections
at each batch size, packed native against torch's F.linear.

    python -m paged.ops.microbench [--model DIR] [--batch-sizes 1,8,64] [--contexts 512,2048]
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from paged.ops.kernel_bench import _decode_case
from paged.shared.config import CacheConfig, ModelConfig
from paged.shared.logging import configure_logging
from paged.shared.protocol import NewSequence, ScheduledSeq, StepInput
from paged.shared.sampling_params import SamplingParams
from paged.worker.attention import cpu_ops, torch_ops
from paged.worker.attention.backend import AttentionOps, get_attention_ops
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.builtin_model import BUILTIN_ARCH
from paged.worker.kv_cache import bytes_per_block
from paged.worker.layers.linear_cpu import PackedLinear
from paged.worker.model_config import ModelArch, load_model_arch
from paged.worker.worker import Worker

DEFAULT_MODEL = Path("/work/shared/models/stories260K")
GREEDY = SamplingParams(temperature=0.0)


class ThroughputRun:
    """Drives one batch through a Worker the way the scheduler would: sequential blocks, one prefill
    step, then decode steps that append a block whenever a sequence crosses a block boundary."""

    def __init__(self, worker: Worker, batch: int, prompt_len: int, first_seq_id: int) -> None:
        self.worker = worker
        self.seq_ids = list(range(first_seq_id, first_seq_id + batch))
        self.prompt_len = prompt_len
        self.lengths = dict.fromkeys(self.seq_ids, 0)  # tokens in the KV cache
        self.tables: dict[int, list[int]] = {seq_id: [] for seq_id in self.seq_ids}
        self.next_block = 0
        self.step_id = 0

    def _schedule(self, seq_id: int, num_tokens: int) -> ScheduledSeq:
        start = self.lengths[seq_id]
        table = self.tables[seq_id]
        needed = -(-(start + num_tokens) // self.worker.block_size) - len(table)
        new_blocks = list(range(self.next_block, self.next_block + needed))
        self.next_block += needed
        scheduled = ScheduledSeq(seq_id, start, num_tokens, len(table), new_blocks)
        table.extend(new_blocks)
        self.lengths[seq_id] = start + num_tokens
        return scheduled

    def _step(self, step: StepInput) -> float:
        started = time.perf_counter()
        output = self.worker.execute_step(step)
        elapsed = time.perf_counter() - started
        if output.errors:
            raise RuntimeError(f"benchmark step failed: {output.errors[0].message}")
        self.step_id += 1
        return elapsed

    def prefill(self, prompts: list[list[int]]) -> float:
        new_seqs = [NewSequence(seq_id, prompt, GREEDY) for seq_id, prompt in zip(self.seq_ids, prompts)]
        scheduled = [self._schedule(seq_id, self.prompt_len) for seq_id in self.seq_ids]
        return self._step(StepInput(self.step_id, scheduled=scheduled, new_seqs=new_seqs))

    def decode(self) -> float:
        return self._step(StepInput(self.step_id, scheduled=[self._schedule(seq_id, 1) for seq_id in self.seq_ids]))

    def free(self) -> None:
        self.worker.execute_step(StepInput(self.step_id, freed_seq_ids=self.seq_ids))


def measure_throughput(
    worker: Worker, batch: int, prompt_len: int, decode_steps: int, repeats: int, progress: Progress
) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one batch size."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, worker.arch.vocab_size, (batch, prompt_len), generator=generator).tolist()
    task = progress.add_task(f"batch {batch}", total=repeats + decode_steps)
    prefill_s: list[float] = []
    for repeat in range(repeats + 1):  # the first run warms up and is not counted
        run = ThroughputRun(worker, batch, prompt_len, first_seq_id=repeat * batch)
        elapsed = run.prefill(prompts)
        if repeat:
            prefill_s.append(elapsed)
            progress.advance(task)
        if repeat < repeats:
            run.free()
    decode_s = 0.0
    for _ in range(decode_steps):
        decode_s += run.decode()
        progress.advance(task)
    run.free()
    return batch * prompt_len / min(prefill_s), batch * decode_steps / decode_s


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: lazy init, kernel compilation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def attention_rows(
    contexts: list[int], batch: int, heads: tuple[int, int], head_dim: int, block_size: int, repeats: int, progress: Progress
) -> list[tuple[str, int, float, float]]:
    """(backend, context, paged ms, dense ms) per backend and context."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backends: dict[str, AttentionOps] = {"torch": torch_ops}
    if device.type == "cuda":
        from paged.worker.attention import triton_ops  # CUDA only: CPU installs need no Triton here

        backends["triton"] = triton_ops
    elif (native := get_attention_ops("cpu")) is not torch_ops:  # torch_ops: the kernel could not be built
        backends = {"cpu": native, **backends}
    num_q_heads, num_kv_heads = heads
    scale = head_dim**-0.5
    rows = []
    task = progress.add_task("attention", total=len(contexts) * len(backends))
    for context in contexts:
        query, k_cache, v_cache, meta, dense_k, dense_v = _decode_case(
            batch, context, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device
        )
        dense_ms = median_ms(
            lambda: F.scaled_dot_product_attention(
                query[:, :, None], dense_k, dense_v, scale=scale, enable_gqa=num_q_heads != num_kv_heads
            ),
            device,
            repeats,
        )
        for name, ops in backends.items():
            paged_ms = median_ms(lambda: ops.paged_attention(query, k_cache, v_cache, meta, scale), device, repeats)
            rows.append((name, context, paged_ms, dense_ms))
            progress.advance(task)
    return rows


def shared_prefix_case(
    num_seqs: int, prefix: int, own: int, query_len: int, heads: tuple[int, int], head_dim: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float]:
    """num_seqs sequences whose tables start with the same prefix // block_size blocks, then blocks of
    their own for `own` cached and `query_len` new tokens, all shuffled in the pool. Returns the query,
    caches, metadata and the attention's FLOPs (QK and PV multiply-adds over the keys each row sees)."""
    num_q_heads, num_kv_heads = heads
    shared_blocks = prefix // block_size
    own_blocks = -(-(prefix - shared_blocks * block_size + own + query_len) // block_size)
    num_blocks = shared_blocks + num_seqs * own_blocks
    physical = torch.randperm(num_blocks).int()
    tables = torch.cat([physical[:shared_blocks].expand(num_seqs, -1), physical[shared_blocks:].view(num_seqs, own_blocks)], dim=1)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    context = prefix + own
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs * query_len, dtype=torch.long),  # the K/V are in place already
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * query_len,
        seq_lens=torch.full((num_seqs,), context + query_len, dtype=torch.int32),
        block_tables=tables.contiguous(),
        max_query_len=query_len,
        max_seq_len=context + query_len,
    )
    keys_seen = num_seqs * (query_len * context + query_len * (query_len + 1) // 2)
    flops = 4.0 * keys_seen * num_q_heads * head_dim
    return torch.randn(num_seqs * query_len, num_q_heads, head_dim), k_cache, v_cache, meta, flops


def shared_prefix_rows(
    cases: dict[str, tuple[int, int, int]], prefix: int, heads: tuple[int, int], head_dim: int, block_size: int,
    baseline: ctypes.CDLL | None, repeats: int, progress: Progress,
) -> list[tuple[str, str, float, float]]:
    """(case, backend, median ms, GFLOP/s) for each case (sequences, own tokens, new tokens each)."""
    backends: dict[str, Callable[..., torch.Tensor]] = {"cpu": cpu_ops.paged_attention}
    if baseline is not None:
        backends["cpu (baseline)"] = partial(cpu_ops.paged_attention, library=baseline)
    backends["torch"] = torch_ops.paged_attention
    scale = head_dim**-0.5
    rows = []
    task = progress.add_task("shared prefix", total=len(cases) * len(backends))
    for name, (num_seqs, own, query_len) in cases.items():
        query, k_cache, v_cache, meta, flops = shared_prefix_case(num_seqs, prefix, own, query_len, heads, head_dim, block_size)
        for backend, attend in backends.items():
            ms = median_ms(lambda: attend(query, k_cache, v_cache, meta, scale), query.device, repeats)
            rows.append((name, backend, ms, flops / ms / 1e6))
            progress.advance(task)
    return rows


def linear_rows(arch: ModelArch, batches: list[int], repeats: int, progress: Progress) -> list[tuple[int, float, float]]:
    """(batch, packed native ms, F.linear ms) for every decoder projection of `arch` (random weights)."""
    hidden, q_width, kv_width = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = [(q_width, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, q_width),
              (arch.intermediate_size, hidden), (arch.intermediate_size, hidden), (hidden, arch.intermediate_size)]  # fmt: skip
    native = cpu_ops.native_linear()
    layers = [torch.nn.Linear(k, n, bias=False) for _ in range(arch.num_layers) for n, k in shapes]
    packed = [PackedLinear(layer, native) for layer in layers]
    rows = []
    task = progress.add_task("linear", total=len(batches))
    for batch in batches:
        inputs = {k: torch.randn(batch, k) for _, k in shapes}

        def run(modules: list[torch.nn.Module]) -> float:
            started = time.perf_counter()
            for module, (_, k) in zip(modules, shapes * arch.num_layers):
                module(inputs[k])
            return time.perf_counter() - started

        run(packed), run(layers)  # warm-up
        # Interleaved, so that both see the same neighbours' load and neither finds the other's weights in cache.
        times = [(run(packed), run(layers)) for _ in range(repeats)]
        rows.append((batch, statistics.median(t[0] for t in times) * 1e3, statistics.median(t[1] for t in times) * 1e3))
        progress.advance(task)
    return rows


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help=f"Hugging Face model directory [default: {DEFAULT_MODEL} if present, else the built-in model]")
@click.option("--batch-sizes", default="1,8,64", show_default=True)
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--decode-steps", default=32, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="prefill repeats (best counts)")
@click.option("--block-size", default=16, show_default=True)
@click.option("--contexts", default="512,2048", show_default=True, help="attention context lengths")
@click.option("--attn-batch", default=8, show_default=True, help="decode sequences in the attention benchmark")
@click.option("--attn-heads", default="32,8", show_default=True, help="query heads,kv heads")
@click.option("--attn-head-dim", default=128, show_default=True)
@click.option("--attn-repeats", default=20, show_default=True)
@click.option("--shared-prefix", default=608, show_default=True, help="tokens the shared-prefix cases share (CPU)")
@click.option("--own-tokens", default=16, show_default=True, help="cached tokens of each decode row's own")
@click.option("--prefill-chunks", default=15, show_default=True, help="prefill chunks over the shared prefix")
@click.option("--chunk-len", default=128, show_default=True)
@click.option("--baseline-kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="another paged_attention.cpp (headers beside it) to time beside this one")
@click.option("--threads", default=1, show_default=True,
              help="torch CPU threads; tiny models run fastest on one, more only add contention on a shared machine")
def main(
    model: Path | None,
    batch_sizes: str,
    prompt_len: int,
    decode_steps: int,
    repeats: int,
    block_size: int,
    contexts: str,
    attn_batch: int,
    attn_heads: str,
    attn_head_dim: int,
    attn_repeats: int,
    shared_prefix: int,
    own_tokens: int,
    prefill_chunks: int,
    chunk_len: int,
    baseline_kernel: Path | None,
    threads: int,
) -> None:
    configure_logging("warning")
    torch.set_num_threads(threads)
    if model is None and (DEFAULT_MODEL / "config.json").is_file():
        model = DEFAULT_MODEL
    batches = [int(b) for b in batch_sizes.split(",")]
    console = Console()

    # A pool just large enough for the largest batch's prompts and decode steps (each run frees its blocks).
    arch = load_model_arch(model) if model else BUILTIN_ARCH
    # (and at least one sequence of the model's whole window, which the worker requires).
    blocks = max(max(batches) * -(-(prompt_len + decode_steps) // block_size), -(-arch.max_model_len // block_size)) + 1
    worker = Worker(
        ModelConfig(model=str(model) if model else None),
        CacheConfig(block_size=block_size, kv_cache_memory=blocks * bytes_per_block(arch, block_size, torch.float32), swap_space=0),
        max_num_batched_tokens=max(batches) * prompt_len,
    )

    with Progress(console=console, transient=True) as progress:
        throughput = [(b, *measure_throughput(worker, b, prompt_len, decode_steps, repeats, progress)) for b in batches]
        attention = attention_rows(
            [int(c) for c in contexts.split(",")],
            attn_batch,
            tuple(int(h) for h in attn_heads.split(",")),  # type: ignore[arg-type]
            attn_head_dim,
            block_size,
            attn_repeats,
            progress,
        )
        native_cpu = worker.device.type == "cpu" and get_attention_ops("cpu") is cpu_ops
        shared: list[tuple[str, str, float, float]] = []
        linear: list[tuple[int, float, float]] = []
        if native_cpu:
            cases = {f"decode {attn_batch} x (shared + {own_tokens})": (attn_batch, own_tokens, 1),
                     f"prefill {prefill_chunks} x {chunk_len} over it": (prefill_chunks, 0, chunk_len)}  # fmt: skip
            baseline = cpu_ops.load_kernel(baseline_kernel) if baseline_kernel else None
            heads = tuple(int(h) for h in attn_heads.split(","))
            shared = shared_prefix_rows(cases, shared_prefix, heads, attn_head_dim, block_size, baseline, attn_repeats, progress)  # type: ignore[arg-type]
            linear = linear_rows(arch, batches, attn_repeats, progress)

    name = model.name if model else "built-in model"
    table = Table(title=f"{name} on {worker.device} ({worker.dtype}, torch threads {torch.get_num_threads()}), "
                        f"prompt {prompt_len}, {decode_steps} decode steps, block size {block_size}")
    for column in ("batch", "prefill tok/s", "decode tok/s", "decode ms/step"):
        table.add_column(column, justify="right")
    for batch, prefill_tps, decode_tps in throughput:
        table.add_row(str(batch), f"{prefill_tps:,.0f}", f"{decode_tps:,.0f}", f"{batch / decode_tps * 1e3:.2f}")
    console.print(table)

    table = Table(title=f"decode attention: batch {attn_batch}, heads {attn_heads}, head_dim {attn_head_dim}, "
                        f"block size {block_size}, shuffled pages (median of {attn_repeats})")
    for column in ("backend", "context", "paged ms", "dense SDPA ms", "paged / dense"):
        table.add_column(column, justify="right")
    for backend, context, paged_ms, dense_ms in attention:
        table.add_row(backend, str(context), f"{paged_ms:.3f}", f"{dense_ms:.3f}", f"{paged_ms / dense_ms:.2f}x")
    console.print(table)
    if shared:
        table = Table(title=f"attention over a {shared_prefix}-token shared prefix: heads {attn_heads}, head_dim "
                            f"{attn_head_dim}, block size {block_size} (median of {attn_repeats})")
        for column in ("case", "backend", "ms", "GFLOP/s"):
            table.add_column(column, justify="right")
        for case, backend, ms, gflops in shared:
            table.add_row(case, backend, f"{ms:.3f}", f"{gflops:.1f}")
        console.print(table)
    if linear:
        table = Table(title=f"decoder projections of {name}, all {arch.num_layers} layers (median of {attn_repeats})")
        for column in ("batch", "packed native ms", "F.linear ms", "native / F.linear"):
            table.add_column(column, justify="right")
        for batch, native_ms, torch_ms in linear:
            table.add_row(str(batch), f"{native_ms:.2f}", f"{torch_ms:.2f}", f"{native_ms / torch_ms:.2f}x")
        console.print(table)


if __name__ == "__main__":
    main()
