"""The worker process: serves one gateway at a time over ZeroMQ and runs its steps strictly in order.

Two threads. The I/O thread owns the ROUTER socket: it answers registrations, sends and checks
heartbeats, decodes steps and forwards outputs, so a long forward pass never looks like death to
the gateway. The main thread owns the model: it takes decoded steps from a queue, runs them one
after another and hands encoded outputs back over an inproc pipe.

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
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import msgspec
import zmq
from setproctitle import setproctitle

from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig, WorkerRole
from paged.shared.logging import configure_logging, get_logger
from paged.shared.startup_failure import exit_on_startup_failure
from paged.shared.systemd_notify import SystemdNotifier
from paged.shared.protocol import (
    HEARTBEAT_INTERVAL_S,
    PROTOCOL_VERSION,
    Codec,
    Heartbeat,
    Hello,
    ProtocolError,
    ProtocolVersionError,
    RegistrationAck,
    RegistrationRefused,
    SeqError,
    Shutdown,
    StepInput,
    StepOutput,
    WorkerRegistration,
)

log = get_logger("worker.server")

GatewayLossPolicy = Literal["exit", "wait"]
GATEWAY_TIMEOUT_S = 3.0


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

    def execute_step(self, step: StepInput) -> StepOutput: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Command:
    kind: Literal["step", "reset", "stop"]
    epoch: int  # session number; outputs of an older session are dropped
    step: StepInput | None = None


class _SessionIO(threading.Thread):
    """The I/O thread: the socket, the session and liveness in both directions."""

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        registration: WorkerRegistration,
        commands: queue.SimpleQueue[_Command],
        pipe_address: str,
        on_gateway_loss: GatewayLossPolicy,
        heartbeat_interval: float,
        gateway_timeout: float,
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.codec = Codec()
        self.registration = registration
        self.commands = commands
        self.on_gateway_loss = on_gateway_loss
        self.heartbeat_interval = heartbeat_interval
        self.gateway_timeout = gateway_timeout
        self.router = context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pipe = context.socket(zmq.PAIR)
        self.pipe.linger = 0
        self.pipe.bind(pipe_address)
        self.epoch = 0
        self.gateway: bytes | None = None  # ROUTER identity of the gateway this worker serves
        self.gateway_id = ""
        self.registering: set[bytes] = set()  # peers sent a registration, not yet acknowledged
        self.last_heard = 0.0
        self.stopping = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pipe, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        try:
            while not self.stopping:
                timeout_ms = max(0.0, next_heartbeat - time.monotonic()) * 1000
                events = dict(poller.poll(timeout_ms))
                if self.pipe in events:
                    self._forward_outputs()
                if self.router in events:
                    self._receive()
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_interval
                    if self.gateway is not None:
                        self._send(self.gateway, Heartbeat(time.time()))
                if self.gateway is not None and now - self.last_heard > self.gateway_timeout:
                    self._gateway_lost(now - self.last_heard)
        finally:
            self.router.close()
            self.pipe.close()

    def _send(self, peer: bytes, message: Hello | WorkerRegistration | Heartbeat | StepOutput) -> None:
        self.router.send_multipart([peer, *self.codec.encode(message)])

    def _forward_outputs(self) -> None:
        while True:
            try:
                epoch, header, payload = self.pipe.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.gateway is not None and int.from_bytes(epoch, "little") == self.epoch:
                self.router.send_multipart([self.gateway, header, payload])

    def _receive(self) -> None:
        while True:
            try:
                peer, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self.codec.decode(frames)
            except ProtocolVersionError as exc:
                log.warning("peer_refused", peer=peer.hex(), error=str(exc))
                continue
            except ProtocolError as exc:
                log.warning("message_dropped", peer=peer.hex(), error=str(exc))
                continue
            self._handle(peer, message)

    def _handle(self, peer: bytes, message: object) -> None:
        current = peer == self.gateway
        if current:
            self.last_heard = time.monotonic()
        match message:
            case StepInput():
                if current:
                    self.commands.put(_Command("step", self.epoch, message))
                else:
                    log.warning("message_dropped", peer=peer.hex(), error="step from a gateway this worker does not serve")
            case Heartbeat():
                pass
            case Hello(protocol_version=version, gateway_id=gateway_id):
                if version != PROTOCOL_VERSION:
                    log.warning("peer_refused", peer=peer.hex(), error=f"hello for protocol {version}, worker speaks {PROTOCOL_VERSION}")
                elif self.gateway is not None and not current and gateway_id != self.gateway_id:
                    log.warning("hello_ignored", peer=peer.hex(), gateway_id=gateway_id, serving=self.gateway_id)
                else:
                    self.registering.add(peer)
                    self._send(peer, self.registration)
            case RegistrationAck(gateway_id=gateway_id) if peer in self.registering:
                self.registering.clear()
                self.gateway, self.gateway_id = peer, gateway_id
                self.last_heard = time.monotonic()
                self._new_epoch()
                log.info("registered", gateway_id=gateway_id, peer=peer.hex(), epoch=self.epoch)
            case RegistrationRefused(reason=reason) if peer in self.registering:
                self.registering.discard(peer)
                log.error("registration_refused", peer=peer.hex(), reason=reason)
            case Shutdown(reason=reason) if current:
                log.info("shutdown_requested", reason=reason)
                self._stop()
            case _:
                log.warning("message_dropped", peer=peer.hex(), error=f"unexpected {type(message).__name__}")

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.commands.put(_Command("reset", self.epoch))

    def _gateway_lost(self, silent_s: float) -> None:
        log.warning("gateway_lost", gateway_id=self.gateway_id, silent_s=round(silent_s, 2), policy=self.on_gateway_loss)
        self.gateway, self.gateway_id = None, ""
        if self.on_gateway_loss == "exit":
            self._stop()
        else:
            self._new_epoch()

    def _stop(self) -> None:
        self.stopping = True
        self.commands.put(_Command("stop", self.epoch))


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
        self.commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
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
        )
        self.io = _SessionIO(
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
        log.info("worker_listening", endpoint=self.endpoint, worker_id=self.worker_id, num_blocks=self.runner.num_blocks)
        try:
            while (command := self.commands.get()).kind != "stop":
                if command.kind == "reset":
                    self._free_all()
                elif command.step is not None and not self.io.stopping:
                    self._run(command.step, command.epoch)
        except KeyboardInterrupt:
            log.info("worker_interrupted")
        finally:
            self.io.stopping = True
            self.io.join(timeout=2)
            self.runner.close()
            self.pipe.close()
            self.context.term()
            log.info("worker_exited", worker_id=self.worker_id)

    def _run(self, step: StepInput, epoch: int) -> None:
        started = time.perf_counter()
        self._track(step)
        try:
            output = self.runner.execute_step(step)
        except Exception as exc:  # the worker isolates per-sequence errors; this is the last resort
            log.exception("step_failed", step_id=step.step_id)
            message = f"worker error in step {step.step_id}: {type(exc).__name__}: {exc}"
            output = StepOutput(step_id=step.step_id, errors=[SeqError(seq.seq_id, message) for seq in step.scheduled])
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
    setproctitle(f"paged-worker {worker_id}")
    notifier = SystemdNotifier.from_environment()
    with exit_on_startup_failure("worker", worker_id=worker_id, endpoint=endpoint, model=model_config.model or "builtin"):
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
