"""One worker session's use of its host's KV store (docs/kv-store.md): the saves and loads of the
step being planned, and those of the steps in flight until their outputs come back.

The KV cache manager asks it to save the content of a cached block the pool is reusing (`save`)
and to load a store hit into a newly allocated block (`load`); the scheduler puts both into the
step (`take`) and hands it each step's output (`step_done`): the saves become loadable, the loaded
slots evictable again. When the worker is lost (`lost`), its saves in flight are abandoned and
their slots quarantined under the worker's name, until a later session of the same worker returns
its first output (`step_done` of a step that was sent): the worker ran every older step by then.
"""

from __future__ import annotations

from paged.gateway.block_hash import BlockHash
from paged.gateway.kv_store_index import KVStoreIndex
from paged.shared.protocol import BlockCopy, StepInput, StepOutput


class KVStoreSession:
    def __init__(self, index: KVStoreIndex, worker: str) -> None:
        self.index = index
        self.worker = worker  # the replica's name: quarantined slots wait for its next session
        self._saves: list[BlockCopy] = []  # device block -> slot, for the step being planned
        self._loads: list[BlockCopy] = []  # slot -> device block, for the step being planned
        self._in_flight: dict[int, tuple[list[BlockCopy], list[BlockCopy]]] = {}  # by step id
        self._answered = False  # a step of this session came back from the worker
        index.sessions.add(self)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.index.lookup(block_hash)

    def save(self, block: int, block_hash: BlockHash, parent: BlockHash | None, depth: int) -> None:
        """The pool reuses cached `block` in the step being planned: save its content first, unless
        the store has it already or has no slot to spare."""
        slot = self.index.reserve(block_hash, parent, depth)
        if slot is not None:
            self._saves.append(BlockCopy(block, slot))

    def pin(self, slot: int) -> None:
        """Keep `slot` for a load the step being planned will order (`load`)."""
        self.index.pin(slot)

    def load(self, slot: int, block: int) -> None:
        """Copy pinned `slot` into device `block` in the step being planned, before its forward pass."""
        self._loads.append(BlockCopy(slot, block))

    def take(self, step_id: int) -> tuple[list[BlockCopy], list[BlockCopy]]:
        """The (saves, loads) of the step being planned, now step `step_id`."""
        saves, loads = self._saves, self._loads
        self._saves, self._loads = [], []  # the step owns its lists now (even empty ones)
        if saves or loads:
            self._in_flight[step_id] = (saves, loads)
        return saves, loads

    def step_done(self, step: StepInput, output: StepOutput, sent: bool) -> list[int]:
        """Apply a step's output (`sent`: it came from the worker). Returns the device blocks whose
        load failed: their content cannot be trusted."""
        if sent and not self._answered:
            self._answered = True
            self.index.release_quarantine(self.worker)
        moves = self._in_flight.pop(step.step_id, None)
        if moves is None:
            return []
        saves, loads = moves
        index = self.index
        failed = output.page_moves_failed
        for copy in saves:
            if failed:
                index.abandon(copy.dst, None)
            else:
                index.saved(copy.dst)
        for copy in loads:
            index.unpin(copy.src, loaded=not failed)
        if failed:
            return [copy.dst for copy in loads]
        if saves:
            index.save_seconds.observe(output.store_save_s)
        if loads:
            index.load_seconds.observe(output.store_load_s)
        return []

    def lost(self) -> None:
        """The worker is gone: its saves in flight may still run (quarantine), its loads do not matter;
        what was planned but never sent is undone."""
        index = self.index
        for saves, loads in self._in_flight.values():
            for copy in saves:
                index.abandon(copy.dst, self.worker)
            for copy in loads:
                index.unpin(copy.src, loaded=False)
        for copy in self._saves:
            index.abandon(copy.dst, None)
        for copy in self._loads:
            index.unpin(copy.src, loaded=False)
        self._in_flight.clear()
        self._saves, self._loads = [], []
        index.sessions.discard(self)

    def _unconfirmed_loads(self) -> list[BlockCopy]:
        """Loads ordered (in the step being planned or in flight) whose step has not come back."""
        return [*self._loads, *(copy for _, loads in self._in_flight.values() for copy in loads)]

    def loading_blocks(self) -> set[int]:
        """Device blocks an unconfirmed load fills: their content is not in yet, and the load may fail."""
        return {copy.dst for copy in self._unconfirmed_loads()}

    def pins(self) -> dict[int, int]:
        """Loads ordered and not yet confirmed, per slot (for the index's audit)."""
        pins: dict[int, int] = {}
        for copy in self._unconfirmed_loads():
            pins[copy.src] = pins.get(copy.src, 0) + 1
        return pins
