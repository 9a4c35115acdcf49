"""The scheduler's queues, each kept in the scheduling policy's order.

Every request gets an `order` on arrival: (priority, arrival number) under the priority policy,
(0, arrival number) under the others, so one sort key serves all policies. Priority values follow
vLLM: LOWER is more important. Within a priority it is first come, first served.

- waiting: requests not holding blocks (new, or preempted by recompute), head first;
- swapped: requests whose blocks are in the host pool, head first;
- running: sequences in the running batch by (request order, index). The tail is the least
  important, latest-arrived request: the next preemption victim (see gateway/preemption.py).
"""

from __future__ import annotations

import bisect

from paged.gateway.request import Request, Sequence, SequenceStatus


def request_order(request: Request) -> tuple[int, int]:
    return request.order


def seq_order(seq: Sequence) -> tuple[int, int, int]:
    return (*seq.request.order, seq.index)


class PolicyQueues:
    def __init__(self, by_priority: bool) -> None:
        self.by_priority = by_priority
        self.waiting: list[Request] = []
        self.swapped: list[Request] = []
        self.running: list[Sequence] = []
        self.waiting_tokens = 0  # known tokens of the waiting requests (the max_waiting_tokens cap)
        self._arrivals = 0

    def stamp_arrival(self, request: Request) -> None:
        self._arrivals += 1
        request.order = (request.priority if self.by_priority else 0, self._arrivals)

    def set_policy(self, by_priority: bool) -> None:
        """Re-order every queue for a reloaded policy; requests keep their arrival numbers."""
        if by_priority == self.by_priority:
            return
        self.by_priority = by_priority
        for request in {*self.waiting, *self.swapped, *(seq.request for seq in self.running)}:
            request.order = (request.priority if by_priority else 0, request.order[1])
        self.waiting.sort(key=request_order)
        self.swapped.sort(key=request_order)
        self.running.sort(key=seq_order)

    # Waiting ------------------------------------------------------------------------------------

    def push_waiting(self, request: Request) -> None:
        request.waiting_tokens = sum(seq.num_tokens for seq in request.live_seqs())
        self.waiting_tokens += request.waiting_tokens
        bisect.insort(self.waiting, request, key=request_order)

    def take_waiting(self, request: Request) -> None:
        """Take a request out of the waiting queue to run it: the head, or one backfilled past it."""
        waiting = self.waiting
        if waiting[0] is request:
            waiting.pop(0)
        else:
            waiting.remove(request)
        self.waiting_tokens -= request.waiting_tokens

    def remove(self, request: Request, was: SequenceStatus) -> None:
        """Take out a request that ended while waiting or swapped (`was`: its sequences' state then)."""
        if was is SequenceStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
            self.waiting_tokens -= request.waiting_tokens
        elif was is SequenceStatus.SWAPPED and request in self.swapped:
            self.swapped.remove(request)

    # Swapped ------------------------------------------------------------------------------------

    def push_swapped(self, request: Request) -> None:
        bisect.insort(self.swapped, request, key=request_order)

    # Running ------------------------------------------------------------------------------------

    def add_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=seq_order)

    def pop_running_request(self, request: Request) -> list[Sequence]:
        """Take a request's sequences off the tail of the running batch, in index order."""
        seqs = []
        while self.running and self.running[-1].request is request:
            seqs.append(self.running.pop())
        seqs.reverse()
        return seqs

    def drop_finished_running(self) -> None:
        self.running = [seq for seq in self.running if seq.status is SequenceStatus.RUNNING]

    @property
    def num_running_requests(self) -> int:
        return len({seq.request for seq in self.running})
