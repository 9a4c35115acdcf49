"""Server configuration: one msgspec Struct per concern, so that a TOML file, the CLI and the wire
(worker registration) all read the same definitions and the same validation."""

from __future__ import annotations

import os
from typing import Literal

import msgspec

MiB = 1 << 20
GiB = 1 << 30

# prefill: computes prompts and sends their KV on; decode: takes KV in and decodes; mixed: both.
WorkerRole = Literal["prefill", "decode", "mixed"]
# Which cached block a prefix-cache tier evicts first (gateway/eviction_policy.py, docs/kv-store.md).
EvictionPolicyName = Literal["lru", "lfu", "depth"]


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
    kv_eviction_policy: EvictionPolicyName = "lru"  # which cached-free block of the pool is reused first: lru, lfu, depth (recompute cost)
    kv_store_eviction_policy: EvictionPolicyName = "lru"  # which entry the host KV store drops first: lru, lfu, depth (recompute cost)


SchedulingPolicy = Literal["prefill-first", "decode-first", "priority"]
PreemptionMode = Literal["recompute", "swap", "auto"]
AdmissionPolicy = Literal["predictive", "greedy"]


class KVSharingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A worker's KV beyond its own pool: transfers to and from other workers (prefill/decode
    disaggregation, docs/disaggregation.md) and the host's shared KV store tier (docs/kv-store.md)."""

    role: WorkerRole = "mixed"  # prefill computes prompts and sends their KV, decode takes KV in and decodes, mixed does both
    kv_transfer_endpoint: str | None = None  # where other workers send KV blocks (ipc://PATH, tcp://HOST:PORT); default: beside --endpoint
    kv_transfer_timeout: float = 10.0  # seconds a KV transfer may make no progress before it fails
    kv_offload_memory: int = 0  # bytes of the host's shared-memory KV store that evicted cached blocks go to; 0: no store
    kv_store_name: str = "paged-kv-store"  # name of that store: every worker of the host given the same name shares it


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Iteration-level scheduling and admission caps."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # decode-first: running sequences keep their per-token latency under load; new prefills take
    # what is left of the token budget (see gateway/step_planner.py for the reasoning).
    # priority: a LOWER request `priority` value is served first (as in vLLM); FCFS within a value.
    scheduling_policy: SchedulingPolicy = "decode-first"
    max_waiting_requests: int = 4096
    max_waiting_tokens: int = 4 * 1024 * 1024
    kv_watermark: float = 0.01
    # predictive: admit only while the blocks the running sequences are expected to need (by the
    # output lengths learned from finished requests) fit under kv_admission_cap; greedy: admit
    # whatever fits now (over-commits the pool; kept for comparison).
    admission_policy: AdmissionPolicy = "predictive"  # predictive, greedy: whatever fits now
    kv_admission_cap: float = 0.99  # predictive admission: the share of the pool the expected peak may fill
    preemption_mode: PreemptionMode = "recompute"  # recompute, swap, auto: per victim, whichever costs less
    # The thrash detector (gateway/thrash_detector.py): over the last thrash_window seconds, the
    # share of computed tokens that were computed again after a preemption, or of evicted cached
    # blocks whose content was needed again soon after; while either is at its threshold admission tightens.
    thrash_window: float = 10.0  # seconds the thrash detector looks back
    thrash_recompute_share: float = 0.1  # recomputed / computed tokens at which the pool thrashes
    thrash_refetch_share: float = 0.5  # evicted cached blocks needed again / evicted at which the pool thrashes

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_admission_cap <= 1.0:
            raise ValueError(f"kv_admission_cap must be in (0, 1], got {self.kv_admission_cap}")
        for name in ("thrash_window", "thrash_recompute_share", "thrash_refetch_share"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What one HTTP client may hold or ask for: slow or endless uploads, idle connections and
    oversized requests are cut off here, before they cost the engine anything."""

    max_connections: int = 1024  # open HTTP connections at once; a connection beyond gets 503 and is closed
    header_timeout: float = 15.0  # seconds a client may take to send a request's headers (also idle keep-alive ones)
    body_timeout: float = 60.0  # seconds a client may take to send a request's body; slower gets 408
    max_body_size: int = 8 * MiB  # bytes of a request body; a larger one gets 413
    max_request_choices: int = 256  # choices (prompts × n) one request may ask for; more gets 400

    def __post_init__(self) -> None:
        for name in ("max_connections", "header_timeout", "body_timeout", "max_body_size", "max_request_choices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def default_cpu_threads(num_workers: int) -> int:
    """Torch threads per CPU worker when not set: one core is left to the gateway (HTTP, scheduling,
    detokenizing), and oversubscribed cores make torch's spinning thread pool much slower, not faster."""
    return max(1, ((os.cpu_count() or 1) - 1) // num_workers)
