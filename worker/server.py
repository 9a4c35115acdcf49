"""The worker process: serves one gateway at a time over ZeroMQ and runs its steps strictly in order.

Two threads. The I/O thread (worker/session_io.py) owns the ROUTER socket: it answers
registrations, sends and checks heartbeats, decodes steps and forwards outputs, so a long forward
pass never looks like death to the gateway. The main thread (here) owns the model: it takes decoded
steps from a queue, runs them one after another and hands encoded outputs back over an inproc pipe.

A session starts when a gateway acknowledges this worker's registration and ends with Shutdown or
when the gateway falls silent; a worker always registers empty (every sequence of the previous
session is freed, and every KV transfer of it cancelled, so that none writes into blocks the next
session hands out), because the gateway re-queues a lost worker's requests elsewhere.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
import structlog
import zmq
from setproctitle import setproctitle

from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig, WorkerRole
from paged.shared.logging import configure_logging, get_logger
from paged.shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    PROTOCOL_VERSION,
    Codec,
    SeqError,
    StepInput,
    StepOutput,
    WorkerRegistration,
)
from paged.shared.startup_failure import exit_on_startup_failure
from paged.shared.systemd_notify import SystemdNotifier
from paged.worker.session_io import GATEWAY_TIMEOUT_S, Command, GatewayLossPolicy, SessionIO

log = get_logger("worker.server")


def default_transfer_endpoint(worker_endpoint: str) -> str:
    """Where a worker takes KV transfers when not told: beside its gateway endpoint, on the same
    transport (ipc: a sibling socket file; tcp: the same interface, any free port)."""
    parts = urlsplit(worker_endpoint)
    if parts.scheme == "ipc":
        return f"{worker_endpoint.removesuffix('.sock')}-kv.sock"
    if parts.scheme == "tcp":
        host = worker_endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
        return f"tcp://{host}:*"
    raise ValueError(f"no default KV transfer endpoint beside {worker_endpoint!r}: set --kv-transfer-endpoint")


class StepRunner(Protocol):
    """What the server needs of a worker: worker.worker.Worker and worker.null_worker.NullWorker."""

    num_blocks: int
    num_host_blocks: int
    block_size: int
    max_model_len: int
    transfer_endpoint: str
    kv_store_id: str
    num_store_slots: int
    page_bytes: int
    block_context_cost: float

    def execute_step(self, step: StepInput) -> StepOutput: ...

    def close(self) -> None: ...


class WorkerServer:
    """Runs `runner`'s steps for whichever gateway registers it at `endpoint`."""

    def __init__(
        self,
        runner: StepRunner,
        endpoint: str,
        *,
        worker_id: str,
        model: str,
        device: str,
        dtype: str,
        role: WorkerRole = "mixed",
        on_gateway_loss: GatewayLossPolicy = "exit",
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        gateway_timeout: float = GATEWAY_TIMEOUT_S,
    ) -> None:
        self.runner = runner
        self.worker_id = worker_id
        self.codec = Codec()
        self.context = zmq.Context()
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        pipe_address = f"inproc://worker-outputs-{id(self)}"
        registration = WorkerRegistration(
            protocol_version=PROTOCOL_VERSION,
            worker_id=worker_id,
            num_blocks=runner.num_blocks,
            num_host_blocks=runner.num_host_blocks,
            block_size=runner.block_size,
            max_model_len=runner.max_model_len,
            model=model,
            device=device,
            dtype=dtype,
            pid=os.getpid(),
            role=role,
            transfer_endpoint=runner.transfer_endpoint,
            kv_store_id=runner.kv_store_id,
            num_store_slots=runner.num_store_slots,
            page_bytes=runner.page_bytes,
            block_context_cost=runner.block_context_cost,
        )
        self.io = SessionIO(
            self.context, endpoint, registration, self.commands, pipe_address,
            on_gateway_loss, heartbeat_interval, gateway_timeout,
        )  # fmt: skip
        self.pipe = self.context.socket(zmq.PAIR)
        self.pipe.linger = 0
        self.pipe.sndhwm = 0  # never full: a send fails only once the I/O thread has gone
        self.pipe.connect(pipe_address)
        self.live_seq_ids: set[int] = set()  # what the runner holds, freed when a session ends
        self.live_transfer_ids: set[int] = set()  # transfers not reported yet, cancelled when a session ends

    @property
    def endpoint(self) -> str:
        return self.io.endpoint

    def serve(self) -> None:
        """Block until Shutdown or (with on_gateway_loss="exit") until the gateway falls silent."""
        self.io.start()
        log.info(
            "worker_listening", progress=f"ready, waiting for the gateway at {self.endpoint}",
            endpoint=self.endpoint, worker_id=self.worker_id, num_blocks=self.runner.num_blocks,
        )  # fmt: skip
        try:
            while (command := self.commands.get()).kind != "stop":
                if command.kind == "reset":
                    self._free_all()
                elif command.step is not None and not self.io.stopping:
                    self._run(command.step, command.epoch, command.errors)
        except KeyboardInterrupt:
            log.info("worker_interrupted")
        finally:
            self.io.stopping = True
            self.io.join(timeout=2)
            self.runner.close()
            self.pipe.close()
            self.context.term()
            log.info("worker_exited", worker_id=self.worker_id)

    def _run(self, step: StepInput, epoch: int, undecodable: dict[int, str] | None = None) -> None:
        started = time.perf_counter()
        self._track(step)
        try:
            output = self.runner.execute_step(step)
        except Exception as exc:  # the worker isolates per-sequence errors; this is the last resort
            log.exception("step_failed", step_id=step.step_id)
            message = f"worker error in step {step.step_id}: {type(exc).__name__}: {exc}"
            output = StepOutput(step_id=step.step_id, errors=[SeqError(seq.seq_id, message) for seq in step.scheduled])
        if undecodable:
            output.errors += [SeqError(seq_id, message) for seq_id, message in undecodable.items()]
        output.total_s = time.perf_counter() - started
        self.live_transfer_ids.difference_update(output.transfers_done)
        self.live_transfer_ids.difference_update(failure.transfer_id for failure in output.transfers_failed)
        try:
            self.pipe.send_multipart([epoch.to_bytes(8, "little"), *self.codec.encode(output)], zmq.NOBLOCK)
        except zmq.Again:  # the I/O thread has closed its end: the session is over, nobody to answer
            pass

    def _track(self, step: StepInput) -> None:
        self.live_seq_ids.difference_update(step.freed_seq_ids)
        self.live_seq_ids.update(seq.seq_id for seq in step.new_seqs)
        for seq in step.scheduled:
            if seq.fork_ids:
                self.live_seq_ids.update(seq.fork_ids)
        self.live_transfer_ids.difference_update(step.kv_cancels)
        self.live_transfer_ids.update(item.transfer_id for item in (*step.kv_sends, *step.kv_receives))

    def _free_all(self) -> None:
        if self.live_seq_ids or self.live_transfer_ids:
            self.runner.execute_step(
                StepInput(step_id=-1, freed_seq_ids=sorted(self.live_seq_ids), kv_cancels=sorted(self.live_transfer_ids))
            )
            self.live_seq_ids.clear()
            self.live_transfer_ids.clear()


def build_runner(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    max_num_batched_tokens: int,
    null_model: bool,
    null_step_s: float = 0.0,
    sharing: KVSharingConfig | None = None,
) -> tuple[StepRunner, str, str, str]:
    """The step runner and its identity: (runner, model, device, dtype)."""
    if null_model:
        from paged.worker.null_worker import NullWorker

        null = NullWorker(model_config, cache_config, max_num_batched_tokens, null_step_s, sharing)
        return null, "null", null.device, null.dtype
    from paged.worker.worker import Worker  # imports torch: only when a model is run

    runner = Worker(model_config, cache_config, max_num_batched_tokens, sharing)
    dtype = str(runner.dtype).removeprefix("torch.")
    return runner, model_config.model or "builtin", str(runner.device), dtype


def run_worker(
    endpoint: str,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    max_num_batched_tokens: int,
    *,
    null_model: bool = False,
    null_step_s: float = 0.0,
    sharing: KVSharingConfig | None = None,
    worker_id: str | None = None,
    on_gateway_loss: GatewayLossPolicy = "exit",
    gateway_timeout: float = GATEWAY_TIMEOUT_S,
    log_level: str | None = None,
    log_json: bool | None = None,
    ignore_sigint: bool = False,
) -> None:
    """Process entry point (`paged-worker`, and each worker `pagedd serve` spawns by this function's
    qualified name: those ignore SIGINT, so that Ctrl-C on the terminal's process group lets the
    gateway drain them first). `ps` shows the process as `paged-worker WORKER_ID`."""
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_level is not None:
        configure_logging(log_level, json=log_json)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    structlog.contextvars.bind_contextvars(worker_id=worker_id)  # every event says which worker
    setproctitle(f"paged-worker {worker_id}")
    notifier = SystemdNotifier.from_environment()
    what = "the null model (no weights)" if null_model else model_config.model or "the built-in model"
    log.info("model_loading", progress=f"loading {what} on {model_config.device}…", model=model_config.model or "builtin", device=model_config.device)
    with exit_on_startup_failure("worker", endpoint=endpoint, model=model_config.model or "builtin"):
        sharing = sharing or KVSharingConfig()
        if sharing.kv_transfer_endpoint is None:
            sharing = msgspec.structs.replace(sharing, kv_transfer_endpoint=default_transfer_endpoint(endpoint))
        runner, model, device, dtype = build_runner(model_config, cache_config, max_num_batched_tokens, null_model, null_step_s, sharing)
        server = WorkerServer(
            runner, endpoint, worker_id=worker_id, model=model, device=device, dtype=dtype, role=sharing.role,
            on_gateway_loss=on_gateway_loss, gateway_timeout=gateway_timeout,
        )  # fmt: skip
    # Ready once the model is loaded and the endpoint bound; the gateway registers the worker later
    # (its unit starts after the workers', see systemd/paged-worker@.service).
    notifier.ready(f"model {model} loaded on {device}, listening on {server.endpoint}")
    server.serve()
