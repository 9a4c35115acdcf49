"""A cluster of schedulers, each driving a verifying simulated worker, joined by one simulated KV
link and one hand-off coordinator: prefill/decode disaggregation without processes or sockets.

It routes requests as the engine does (gateway/router.py), steps every worker in turn, checks the
block accounting of every scheduler and of the coordinator after every step, and can lose a worker
the way the supervisor does (its requests re-routed, a fresh empty scheduler and worker in its place).
"""

from __future__ import annotations

from dataclasses import dataclass

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.handoff import HandoffCoordinator, HandoffNode
from paged.gateway.kv_store_index import KVStoreIndex
from paged.gateway.outputs import RequestOutput
from paged.gateway.request import Request
from paged.gateway.router import route
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_kv_link import SimulatedKVLink
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import WorkerRole
from support.scheduler_steps import BS, make

PAGE_BYTES = 1000


def sim_token(seq_id: int, position: int) -> int:
    return 1 + (seq_id * 7 + position) % 50


@dataclass(eq=False)
class LocalNode:
    """One worker of the cluster: what the coordinator (HandoffNode) and the router need of it."""

    name: str
    role: WorkerRole
    scheduler: Scheduler | None
    loop: StepLoop
    transfer_endpoint: str = "sim"
    page_bytes: int = PAGE_BYTES
    ready: bool = True

    def wake(self) -> None:
        pass

    @property
    def load(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.num_running + self.scheduler.num_waiting


class Cluster:
    def __init__(
        self,
        roles: list[WorkerRole],
        num_blocks: int = 64,
        *,
        overlapped: bool = False,
        store: tuple[KVStoreIndex, list[list[int | None]]] | None = None,
        **config: object,
    ) -> None:
        """`store`: a host KV store every worker attaches (support.scheduler_steps.host_store)."""
        self.link = SimulatedKVLink()
        self.num_blocks = num_blocks
        self.overlapped = overlapped
        self.store_index, self.arena = store if store is not None else (None, None)
        self.config = config
        self.choose_token = sim_token
        self.handoff = HandoffCoordinator(lambda: self.nodes, self._moved)
        self.nodes: list[LocalNode] = []
        for index, role in enumerate(roles):
            self.nodes.append(LocalNode(str(index), role, None, None))  # type: ignore[arg-type]
            self._start(self.nodes[-1])
        self.outputs: list[RequestOutput] = []
        self.placement: dict[str, LocalNode] = {}  # request id -> the node running it now
        self.handed_over: dict[str, str] = {}  # request id -> the node it was handed to

    def _start(self, node: LocalNode) -> None:
        """A fresh (or respawned) worker: an empty scheduler and simulated worker."""
        scheduler = make(self.num_blocks, store_index=self.store_index, worker_name=node.name, **self.config)  # type: ignore[arg-type]
        scheduler.handoff = self.handoff
        worker = SimulatedWorker(
            self.num_blocks, BS, choose_token=lambda s, p: self.choose_token(s, p), store=self.arena, kv_link=self.link
        )
        node.scheduler, node.loop, node.ready = scheduler, StepLoop(scheduler, worker, overlapped=self.overlapped), True

    def _moved(self, request: Request, node: HandoffNode) -> None:
        assert isinstance(node, LocalNode)
        self.placement[request.request_id] = node
        self.handed_over[request.request_id] = node.name

    def add(self, request: Request) -> LocalNode:
        node = route(self.nodes, request)  # type: ignore[arg-type]
        assert node.scheduler is not None
        node.scheduler.add_request(request)
        self.placement[request.request_id] = node  # type: ignore[assignment]
        return node  # type: ignore[return-value]

    def busy(self) -> bool:
        return any(
            node.scheduler is not None and (node.scheduler.needs_step() or node.loop.pipeline.num_in_flight) for node in self.nodes
        )

    def step_all(self) -> None:
        """One step of every worker that has something to do, auditing after each."""
        for node in self.nodes:
            scheduler = node.scheduler
            if scheduler is None:
                continue
            if scheduler.needs_step():
                node.loop.step()
            elif node.loop.pipeline.num_in_flight:
                node.loop.drain()
            self.outputs += node.loop.outputs
            node.loop.outputs.clear()
            self.audit()

    def run(self, max_rounds: int = 5000) -> None:
        rounds = 0
        while self.busy():
            self.step_all()
            rounds += 1
            assert rounds < max_rounds, "no progress"
        self.audit()

    def audit(self) -> None:
        for node in self.nodes:
            if node.scheduler is not None:
                assert_block_accounting(node.scheduler)
        assert_block_accounting(self.handoff)

    def lose(self, node: LocalNode) -> None:
        """The worker is lost, as the supervisor and engine handle it: transfers ended, its requests
        re-routed to the others, then it comes back empty."""
        scheduler = node.scheduler
        assert scheduler is not None
        node.scheduler, node.ready = None, False
        self.link.drop_worker(node.loop.worker)
        self.handoff.worker_lost(scheduler)
        for request in scheduler.take_all_requests():
            self.add(request)
        self._start(node)

    def abort(self, request_id: str) -> None:
        scheduler = self.placement[request_id].scheduler
        assert scheduler is not None and scheduler.abort_request(request_id)

    def all_free(self) -> bool:
        return all(node.scheduler is not None and node.scheduler.stats().used_blocks == 0 for node in self.nodes)
