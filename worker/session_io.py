"""The worker process's I/O thread: the ROUTER socket the gateway talks to, the session and
liveness in both directions (worker/server.py runs the steps on the main thread).

It answers registrations, sends and checks heartbeats, decodes steps and forwards outputs, so a
long forward pass never looks like death to the gateway. Decoded steps go to the main thread as
`Command`s on a queue; encoded outputs come back over an inproc PAIR pipe, tagged with the session
(epoch) they belong to, and outputs of an older session are dropped.

A session starts when a gateway acknowledges this worker's registration (a new epoch: the main
thread frees everything of the previous one) and ends with Shutdown or when the gateway falls
silent (`on_gateway_loss`: exit, or start a new epoch and wait for a gateway).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal

import structlog
import zmq

from paged.shared.logging import get_logger
from paged.shared.protocol import (
    PROTOCOL_VERSION,
    Codec,
    Heartbeat,
    Hello,
    ProtocolError,
    ProtocolVersionError,
    RegistrationAck,
    RegistrationRefused,
    Shutdown,
    StepInput,
    StepOutput,
    WorkerRegistration,
)
from paged.worker.step_decoding import UnsalvageableStep, is_step, salvage_step

log = get_logger("worker.session_io")

GatewayLossPolicy = Literal["exit", "wait"]
GATEWAY_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Command:
    kind: Literal["step", "reset", "stop"]
    epoch: int  # session number; outputs of an older session are dropped
    step: StepInput | None = None
    errors: dict[int, str] | None = None  # sequences whose items did not decode (worker/step_decoding.py)


class SessionIO(threading.Thread):
    """The I/O thread: the socket, the session and liveness in both directions."""

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        registration: WorkerRegistration,
        commands: queue.SimpleQueue[Command],
        pipe_address: str,
        on_gateway_loss: GatewayLossPolicy,
        heartbeat_interval: float,
        gateway_timeout: float,
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.log_context = structlog.contextvars.get_contextvars()  # a thread starts without its creator's
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
        structlog.contextvars.bind_contextvars(**self.log_context)
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
                if peer == self.gateway and is_step(frames):
                    self._salvage(frames[1], str(exc))
                else:
                    log.warning("message_dropped", peer=peer.hex(), error=str(exc))
                continue
            self._handle(peer, message)

    def _salvage(self, payload: bytes, error: str) -> None:
        """A step of this session that does not decode whole: run what can be, fail the rest's
        sequences; with nothing to blame, end the session (its output can never be sent)."""
        self.last_heard = time.monotonic()
        try:
            step, errors = salvage_step(payload)
        except UnsalvageableStep as exc:
            log.error("step_undecodable", gateway_id=self.gateway_id, error=str(exc), policy="new session")
            self.gateway, self.gateway_id = None, ""
            self._new_epoch()  # silent from now on: the gateway declares this session lost and registers anew
            return
        log.warning("step_items_undecodable", step_id=step.step_id, seq_ids=sorted(errors), error=error)
        self.commands.put(Command("step", self.epoch, step, errors))

    def _handle(self, peer: bytes, message: object) -> None:
        current = peer == self.gateway
        if current:
            self.last_heard = time.monotonic()
        match message:
            case StepInput():
                if current:
                    self.commands.put(Command("step", self.epoch, message))
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
        self.commands.put(Command("reset", self.epoch))

    def _gateway_lost(self, silent_s: float) -> None:
        log.warning("gateway_lost", gateway_id=self.gateway_id, silent_s=round(silent_s, 2), policy=self.on_gateway_loss)
        self.gateway, self.gateway_id = None, ""
        if self.on_gateway_loss == "exit":
            self._stop()
        else:
            self._new_epoch()

    def _stop(self) -> None:
        self.stopping = True
        self.commands.put(Command("stop", self.epoch))
