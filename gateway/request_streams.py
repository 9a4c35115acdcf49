"""Each running request's stream of outputs to its one consumer (an HTTP handler), and the
replica that currently runs it."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from paged.gateway.outputs import RequestOutput
from paged.gateway.replica import Replica
from paged.gateway.request import Request


class OutputStream:
    """One request's outputs, in order, for its single consumer. The step loop feeds one per running
    request every step, so this is asyncio.Queue cut down to what that needs (no size bound, no
    task accounting, at most one waiter), which makes a put and its get about a third cheaper."""

    __slots__ = ("_outputs", "_waiter")

    def __init__(self) -> None:
        self._outputs: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, output: RequestOutput) -> None:
        self._outputs.append(output)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # its consumer may have been cancelled
                waiter.set_result(None)

    async def get(self) -> RequestOutput:
        while not self._outputs:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._outputs.popleft()


@dataclass(slots=True)
class TrackedRequest:
    """A request the engine streams outputs for, and the replica that currently runs it."""

    request: Request
    replica: Replica
    outputs: OutputStream = field(default_factory=OutputStream)
    answered: bool = False  # an output was handed to the stream (the first carries queue_s)

    def deliver(self, output: RequestOutput) -> None:
        if not self.answered:
            self.answered = True
            request = self.request
            if output.queue_s is None and request.first_scheduled_time is not None:
                output.queue_s = request.first_scheduled_time - request.arrival_time
        self.outputs.put(output)
