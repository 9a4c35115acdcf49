"""Server configuration: one msgspec Struct per concern, so that a TOML file, the CLI and the wire
(worker registration) all read the same definitions and the same validation."""

from __future__ import annotations

import os
from typing import Literal

import msgspec

MiB = 1 << 20
GiB = 1 << 30


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which model to run and how."""

    model: str | None = None  # Hugging Face checkpoint directory; None: the built-in tiny Llama
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the checkpoint's on GPU, float32 on CPU
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: triton on CUDA, cpu on CPU (the native C++ kernel, built at first use; torch if no compiler).
    # torch: the reference path, which gathers every page each layer (several times slower).
    attention_backend: Literal["auto", "cpu", "torch", "triton"] = "auto"
    max_model_len: int | None = None  # None: the model's context window
    seed: int = 0  # seeds the built-in model's weights and unseeded sampling
    cpu_threads: int | None = None  # torch threads of a CPU worker; default: the cores less one for the gateway, shared by the workers


class CacheConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The KV page pool: its size and how the gateway allocates from it."""

    block_size: int = 16
    kv_cache_memory: int = 256 * MiB  # bytes of KV pages per worker on CPU
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + activations + KV pages
    kv_allocator: Literal["paged", "contiguous"] = "paged"
    enable_prefix_caching: bool = True
    swap_space: int = 1 * GiB  # bytes of host memory per worker for swapped-out blocks


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Iteration-level scheduling and admission caps."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # decode-first: running sequences keep their per-token latency under load; new prefills take
    # what is left of the token budget (see gateway/scheduler.py for the reasoning).
    # priority: a LOWER request `priority` value is served first (as in vLLM); FCFS within a value.
    scheduling_policy: Literal["prefill-first", "decode-first", "priority"] = "decode-first"
    max_waiting_requests: int = 4096
    max_waiting_tokens: int = 4 * 1024 * 1024
    kv_watermark: float = 0.01
    preemption_mode: Literal["recompute", "swap"] = "recompute"


def default_cpu_threads(num_workers: int) -> int:
    """Torch threads per CPU worker when not set: one core is left to the gateway (HTTP, scheduling,
    detokenizing), and oversubscribed cores make torch's spinning thread pool much slower, not faster."""
    return max(1, ((os.cpu_count() or 1) - 1) // num_workers)
