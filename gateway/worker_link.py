"""The gateway's connection to one worker process: registration, steps out, outputs back, liveness.

One `WorkerLink` per worker endpoint. Each registration opens a fresh DEALER socket (a fresh
identity), so nothing queued for a worker that was declared dead reaches its successor, and the
worker, which frees everything when it registers, always starts a session empty.

Liveness: the link sends a heartbeat every `heartbeat_interval` and declares the worker lost when
nothing at all (heartbeat or output) has arrived for `death_timeout`, or at once when the worker's
child process exits (its sentinel becomes readable).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import zmq
import zmq.asyncio

from paged.shared.logging import get_logger
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
    Shutdown,
    StepInput,
    StepOutput,
    WorkerRegistration,
)

log = get_logger("gateway.worker_link")

DEATH_TIMEOUT_S = 1.5  # plus at most one heartbeat interval of checking: lost within 2 s
SHUTDOWN_LINGER_MS = 500  # a closing socket still delivers the Shutdown queued just before


class WorkerLost(Exception):
    """The worker stopped answering or its process exited; its session is over."""


class RegistrationError(Exception):
    """The worker did not register in time, or was refused (protocol version, model mismatch)."""


class ChildProcess(Protocol):
    """What the link watches of a worker it spawned (multiprocessing.Process fits)."""

    @property
    def sentinel(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None: ...


class WorkerLink:
    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: str,
        *,
        name: str,
        gateway_id: str,
        process: ChildProcess | None = None,
        accept: Callable[[WorkerRegistration], str | None] = lambda registration: None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        death_timeout: float = DEATH_TIMEOUT_S,
    ) -> None:
        self.context = context
        self.endpoint = endpoint
        self.name = name
        self.gateway_id = gateway_id
        self.process = process
        self.accept = accept  # returns a refusal reason, or None to accept
        self.heartbeat_interval = heartbeat_interval
        self.death_timeout = death_timeout
        self.codec = Codec()
        self.registration: WorkerRegistration | None = None
        self.lost_reason: str | None = None
        self.lost = asyncio.Event()  # set when the current session ends
        self.decode_s = 0.0  # CPU time decoding step outputs, for the gateway's per-step overhead
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outputs: asyncio.Queue[StepOutput | None] = asyncio.Queue()  # None: the session ended
        self._registered: asyncio.Future[WorkerRegistration] | None = None
        self._last_heard = 0.0
        self._sentinel_watched = False

    @property
    def connected(self) -> bool:
        return self.registration is not None and self.lost_reason is None

    async def register(self, timeout: float | None = None) -> WorkerRegistration:
        """Open a session: say hello until the worker registers, then acknowledge it.
        Raises RegistrationError when refused or after `timeout` seconds."""
        await self._end_session()
        loop = asyncio.get_running_loop()
        self.lost_reason = None
        self.lost = asyncio.Event()
        self.decode_s = 0.0
        self.registration = None
        self._outputs = asyncio.Queue()
        self._registered = loop.create_future()
        self._socket = self.context.socket(zmq.DEALER)
        self._socket.linger = 0
        # Queue nothing for a worker that is not connected: hellos do not pile up while it loads,
        # and a step sent after its connection dropped fails at once instead of waiting for a
        # successor (every send is non-blocking, see _send).
        self._socket.immediate = True
        self._socket.connect(self.endpoint)
        self._tasks = [asyncio.create_task(self._read(), name=f"link-{self.name}-read")]
        hello = Hello(PROTOCOL_VERSION, self.gateway_id)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while not self._registered.done():
                if self._process_exited():
                    raise RegistrationError(f"worker {self.name} process exited with code {self.process.exitcode}")  # type: ignore[union-attr]
                await self._send(hello)
                wait = self.heartbeat_interval if deadline is None else min(self.heartbeat_interval, deadline - loop.time())
                if wait <= 0:
                    raise RegistrationError(f"worker {self.name} at {self.endpoint} did not register within {timeout:g} s")
                await asyncio.wait([self._registered], timeout=wait)
            registration = self._registered.result()
        except BaseException:
            await self._end_session()
            raise
        self.registration = registration
        self._last_heard = time.monotonic()
        await self._send(RegistrationAck(self.gateway_id))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"link-{self.name}-watch"))
        if self.process is not None and not self._sentinel_watched:
            loop.add_reader(self.process.sentinel, self._on_process_exit)
            self._sentinel_watched = True
        log.info(
            "worker_registered", progress=f"registered: {registration.num_blocks} KV blocks of {registration.block_size} tokens on {registration.device}",
            worker=self.name, worker_id=registration.worker_id, endpoint=self.endpoint,
            num_blocks=registration.num_blocks, block_size=registration.block_size, model=registration.model,
            device=registration.device, dtype=registration.dtype, pid=registration.pid,
        )  # fmt: skip
        return registration

    async def send_step(self, step: StepInput) -> None:
        if self.connected and not await self._send(step):
            self._lose(f"worker {self.name} connection dropped")
        if not self.connected:
            raise WorkerLost(self.lost_reason or f"worker {self.name} is not registered")

    async def receive(self) -> StepOutput:
        """The next step output, in step order. Raises WorkerLost when the session ends."""
        output = await self._outputs.get()
        if output is None:
            self._outputs.put_nowait(None)  # every later receive() fails too
            raise WorkerLost(self.lost_reason or "session closed")
        return output

    async def close(self, reason: str = "gateway shutting down") -> None:
        """Tell the worker to exit and end the session."""
        if self.connected:
            await self._send(Shutdown(reason))
        self._stop_watching_process()
        self.registration = None  # a deliberate end, not a loss worth a warning
        self._lose(reason)
        await self._end_session(linger_ms=SHUTDOWN_LINGER_MS)

    # --- session internals ----------------------------------------------------------------------

    async def _send(self, message: Hello | RegistrationAck | RegistrationRefused | Heartbeat | Shutdown | StepInput) -> bool:
        """Send without waiting; False when the worker is not connected (nothing is queued)."""
        assert self._socket is not None
        try:
            await self._socket.send_multipart(self.codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    async def _read(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            started = time.thread_time()
            try:
                message = self.codec.decode(frames)
            except ProtocolVersionError as exc:
                await self._refuse(str(exc))
                continue
            except ProtocolError as exc:
                log.warning("message_dropped", worker=self.name, endpoint=self.endpoint, error=str(exc))
                continue
            self._last_heard = time.monotonic()
            match message:
                case StepOutput():
                    self.decode_s += time.thread_time() - started
                    if self.connected:
                        self._outputs.put_nowait(message)
                case Heartbeat():
                    pass
                case WorkerRegistration():
                    await self._on_registration(message)
                case _:
                    log.warning("message_dropped", worker=self.name, error=f"unexpected {type(message).__name__}")

    async def _on_registration(self, registration: WorkerRegistration) -> None:
        if self._registered is None or self._registered.done():
            return  # an answer to a repeated hello
        if registration.protocol_version != PROTOCOL_VERSION:
            reason = f"worker speaks protocol version {registration.protocol_version}, gateway {PROTOCOL_VERSION}"
        else:
            reason = self.accept(registration)
        if reason is None:
            self._registered.set_result(registration)
        else:
            await self._refuse(reason)

    async def _refuse(self, reason: str) -> None:
        log.error("worker_refused", worker=self.name, endpoint=self.endpoint, reason=reason)
        await self._send(RegistrationRefused(reason))
        if self._registered is not None and not self._registered.done():
            self._registered.set_exception(RegistrationError(f"worker {self.name} at {self.endpoint} refused: {reason}"))

    async def _watch(self) -> None:
        heartbeat = Heartbeat(0.0)
        while self.connected:
            heartbeat.sent_at = time.time()
            await self._send(heartbeat)
            silent = time.monotonic() - self._last_heard
            if silent > self.death_timeout:
                self._lose(f"worker {self.name} silent for {silent:.2f} s")
                return
            await asyncio.sleep(self.heartbeat_interval)

    def _process_exited(self) -> bool:
        return self.process is not None and self.process.exitcode is not None

    def _on_process_exit(self) -> None:
        self._stop_watching_process()
        self.process.join(0.1)  # type: ignore[union-attr]  # the sentinel fires just before the child can be reaped
        self._lose(f"worker {self.name} process exited with code {self.process.exitcode}")  # type: ignore[union-attr]

    def _stop_watching_process(self) -> None:
        if self._sentinel_watched and self.process is not None:
            asyncio.get_running_loop().remove_reader(self.process.sentinel)
            self._sentinel_watched = False

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self.lost.set()
        if self.registration is not None:
            log.warning("worker_lost", worker=self.name, endpoint=self.endpoint, reason=reason)
        self._outputs.put_nowait(None)

    async def _end_session(self, linger_ms: int = 0) -> None:
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._socket is not None:
            self._socket.close(linger=linger_ms)
            self._socket = None
