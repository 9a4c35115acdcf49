"""`pagedd serve`'s worker processes: one per visible CUDA device (or `--workers N` on CPU), each on
an ipc:// endpoint in a private runtime directory (its KV transfer endpoint beside it), with the role
`--workers-layout` gives it, started at the worker's entry point by its
qualified name (shared/entry_points.py: the gateway never imports the worker) with
multiprocessing's spawn method (no fork: the gateway has threads and sockets a child must not
inherit)."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec

from paged.gateway.replica import WorkerSpec
from paged.gateway.stale_runtime_dirs import claim, remove_stale_runtime_dirs
from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig, WorkerRole, default_cpu_threads
from paged.shared.entry_points import spawn_entry_point

WORKER_ENTRY_POINT = "paged.worker.server:run_worker"


def visible_cuda_devices() -> int:
    """How many CUDA devices this host shows; torch is imported only where a GPU might exist."""
    if not Path("/dev/nvidiactl").exists():
        return 0
    import torch

    return torch.cuda.device_count()


def worker_devices(device: str, num_workers: int | None) -> list[str]:
    """The device of each worker: every visible GPU for auto/cuda, else `num_workers` (default 1) CPU workers."""
    if device in ("auto", "cuda"):
        count = visible_cuda_devices()
        if count:
            if num_workers is not None and num_workers != count:
                raise ValueError(f"--workers {num_workers} on {count} visible CUDA devices: paged runs one worker per GPU")
            return [f"cuda:{index}" for index in range(count)]
        if device == "cuda":
            raise ValueError("--device cuda but no CUDA device is visible")
        device = "cpu"
    if device.startswith("cuda:"):
        return [device]
    return [device] * (num_workers or 1)


RUNTIME_DIR_PREFIX = "paged-"


class RuntimeDir:
    """A private directory for ipc endpoints, removed on close. It names its owner, and making one
    first removes those a forced exit left behind (gateway/stale_runtime_dirs.py)."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        remove_stale_runtime_dirs(Path(base), RUNTIME_DIR_PREFIX)
        self.path = Path(tempfile.mkdtemp(prefix=RUNTIME_DIR_PREFIX, dir=base))
        claim(self.path)

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.path / name}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def spawn_worker(
    endpoint: str,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    max_num_batched_tokens: int,
    *,
    worker_id: str,
    null_model: bool,
    null_step_s: float,
    sharing: KVSharingConfig,
    on_gateway_loss: str,
    log_level: str,
    log_json: bool | None,
) -> BaseProcess:
    return spawn_entry_point(
        WORKER_ENTRY_POINT, endpoint, model_config, cache_config, max_num_batched_tokens,
        process_name=f"paged-worker-{worker_id}", null_model=null_model, null_step_s=null_step_s, worker_id=worker_id,
        on_gateway_loss=on_gateway_loss, log_level=log_level, log_json=log_json, ignore_sigint=True, sharing=sharing,
    )  # fmt: skip


def local_workers(
    runtime_dir: RuntimeDir,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    max_num_batched_tokens: int,
    *,
    num_workers: int | None,
    null_model: bool,
    log_level: str,
    log_json: bool | None,
    null_step_s: float = 0.0,
    sharing: KVSharingConfig | None = None,
    roles: list[WorkerRole] | None = None,
) -> list[WorkerSpec]:
    """One WorkerSpec per device; the engine starts (and, after a crash, restarts) each process.
    `sharing` names the host KV store they all attach (the first to start creates it); `roles` (a
    layout, shared/workers_layout.py) sets the number of workers and each one's role."""
    if roles is not None:
        if num_workers is not None and num_workers != len(roles):
            raise ValueError(f"--workers {num_workers} but the workers layout has {len(roles)} workers")
        num_workers = len(roles)
    devices = ["cpu"] * (num_workers or 1) if null_model else worker_devices(model_config.device, num_workers)
    specs = []
    for index, device in enumerate(devices):
        role = roles[index] if roles is not None else "mixed"
        endpoint = runtime_dir.endpoint(f"worker-{index}.sock")
        config = msgspec.structs.replace(model_config, device=device)
        if device == "cpu" and config.cpu_threads is None:
            config = msgspec.structs.replace(config, cpu_threads=default_cpu_threads(len(devices)))
        spawn = functools.partial(
            spawn_worker, endpoint, config, cache_config, max_num_batched_tokens,
            worker_id=str(index), null_model=null_model, null_step_s=null_step_s, on_gateway_loss="exit", log_level=log_level, log_json=log_json,
            sharing=msgspec.structs.replace(sharing or KVSharingConfig(), role=role),
        )  # fmt: skip
        specs.append(WorkerSpec(endpoint, spawn, role))
    return specs
