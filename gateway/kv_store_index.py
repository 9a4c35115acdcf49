"""The gateway's index of one host KV store (docs/kv-store.md): which block hash each slot of the
shared-memory arena holds, slot allocation, the store's eviction policy, and the rules that keep a
store shared by several workers safe. The arena itself is the workers' (worker/kv_store.py); they
only copy pages in and out of the slots this index names.

One index per store id, shared by every replica whose worker attached that store
(`KVStoreIndexes`), so a prefix one worker saved is a hit on another. Each worker session uses it
through a KVStoreSession (gateway/kv_store_session.py), which orders the copies in its steps.

A slot is exactly one of:
- free;
- saving: a save was ordered in a step whose output has not come back. Not loadable: steps to
  different workers run in no particular order, so only the output proves the save ran;
- ready: holds its block's content, loadable; evictable unless pinned (a load in flight reads it);
- quarantined: a save was in flight on a worker that was lost. That worker may still run the step
  and write the slot, so the slot stays out of use until the worker's next session returns its first
  output (a worker runs every queued step of an old session before a new one).
A slot is written only by the save it was reserved for, and a pinned slot is neither evicted nor
reserved again: these two rules order a save on one worker before a load on another.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paged.gateway.block_hash import BlockHash
from paged.gateway.eviction_policy import EvictionPolicy, make_policy
from paged.gateway.stats import STORE_SECONDS_BUCKETS, Histogram, KVStoreStats
from paged.shared.config import EvictionPolicyName

if TYPE_CHECKING:
    from paged.gateway.kv_store_session import KVStoreSession


@dataclass(slots=True)
class StoreEntry:
    block_hash: BlockHash
    slot: int
    ready: bool = False
    pins: int = 0  # loads in flight reading the slot


class KVStoreIndex:
    def __init__(self, store_id: str, num_slots: int, policy: EvictionPolicy, page_bytes: int = 0) -> None:
        self.store_id = store_id
        self.num_slots = num_slots
        self.page_bytes = page_bytes
        self.policy = policy
        self._entries: dict[BlockHash, StoreEntry] = {}
        self._slots: list[StoreEntry | None] = [None] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: slot 0 first
        self._quarantine: dict[str, list[int]] = {}  # by the worker that may still write them
        # Saves and loads count the copies that ran (their step came back); failed ones, the copies
        # ordered that never will be confirmed (their step's page moves failed, or its worker was lost).
        self.saves = self.loads = self.failed_saves = self.failed_loads = 0
        self.evictions = self.dropped_saves = 0
        self.save_seconds = Histogram(STORE_SECONDS_BUCKETS)
        self.load_seconds = Histogram(STORE_SECONDS_BUCKETS)
        # The worker sessions using this store (a session dropped without being lost leaves by itself).
        self.sessions: weakref.WeakSet[KVStoreSession] = weakref.WeakSet()

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The slot holding `block_hash`'s content, if it is ready to load."""
        entry = self._entries.get(block_hash)
        return entry.slot if entry is not None and entry.ready else None

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._entries

    # Saves ----------------------------------------------------------------------------------------

    def reserve(self, block_hash: BlockHash, parent: BlockHash | None, depth: int) -> int | None:
        """A slot to save `block_hash`'s content into, or None: it is stored already (its entry only
        counts as used again) or every slot is saving, pinned or quarantined (the content is lost)."""
        entry = self._entries.get(block_hash)
        if entry is not None:
            if self.policy.is_evictable(entry.slot):
                self.policy.release(entry.slot)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = self.policy.victim()
            if victim is None:
                self.dropped_saves += 1
                return None
            self._drop(victim)
            self.evictions += 1
            slot = victim
        entry = StoreEntry(block_hash, slot)
        self._entries[block_hash] = self._slots[slot] = entry
        self.policy.track(slot, block_hash, parent, depth)
        return slot

    def saved(self, slot: int) -> None:
        """The save into `slot` ran: its content is loadable."""
        entry = self._slots[slot]
        assert entry is not None and not entry.ready, f"slot {slot} was not saving"
        entry.ready = True
        self.policy.release(slot)
        self.saves += 1

    def abandon(self, slot: int, writer: str | None) -> None:
        """The save into `slot` will not be confirmed. `writer`: the lost worker that may still
        write it (the slot is quarantined until its next session answers); None: it ran or never will."""
        entry = self._slots[slot]
        assert entry is not None and not entry.ready, f"slot {slot} was not saving"
        self._drop(slot)
        self.failed_saves += 1
        if writer is None:
            self._free.append(slot)
        else:
            self._quarantine.setdefault(writer, []).append(slot)

    def release_quarantine(self, writer: str) -> None:
        """`writer`'s worker has run every step of its earlier sessions: its quarantined slots are free."""
        self._free.extend(self._quarantine.pop(writer, ()))

    # Loads ----------------------------------------------------------------------------------------

    def pin(self, slot: int) -> None:
        """A load from `slot` is ordered: keep it until the load ran (a prefix hit, for the policy)."""
        entry = self._slots[slot]
        assert entry is not None and entry.ready, f"slot {slot} is not ready to load"
        entry.pins += 1
        self.policy.hold(slot)
        self.policy.hit(slot)

    def unpin(self, slot: int, loaded: bool) -> None:
        """A load from `slot` ran (`loaded`), or never will (its step's page moves failed, its worker
        was lost, or it was never sent)."""
        entry = self._slots[slot]
        assert entry is not None and entry.pins > 0, f"slot {slot} was not pinned"
        entry.pins -= 1
        if loaded:
            self.loads += 1
        else:
            self.failed_loads += 1
        if not entry.pins:
            self.policy.release(slot)

    # Whole store ----------------------------------------------------------------------------------

    def _drop(self, slot: int) -> None:
        entry = self._slots[slot]
        assert entry is not None
        del self._entries[entry.block_hash]
        self._slots[slot] = None
        self.policy.untrack(slot)

    def flush(self) -> int:
        """Forget every ready entry no load is reading (the admin's flush); returns how many."""
        dropped = self.policy.order()
        for slot in dropped:
            self._drop(slot)
            self._free.append(slot)
        return len(dropped)

    def stats(self) -> KVStoreStats:
        entries = self._entries.values()
        ready = sum(1 for entry in entries if entry.ready)
        return KVStoreStats(
            store_id=self.store_id,
            policy=self.policy.name,
            num_slots=self.num_slots,
            page_bytes=self.page_bytes,
            free_slots=len(self._free),
            saving_slots=len(self._entries) - ready,
            ready_slots=ready,
            pinned_slots=sum(1 for entry in entries if entry.pins),
            quarantined_slots=sum(len(slots) for slots in self._quarantine.values()),
            saves=self.saves,
            loads=self.loads,
            failed_saves=self.failed_saves,
            failed_loads=self.failed_loads,
            evictions=self.evictions,
            dropped_saves=self.dropped_saves,
            save_seconds=self.save_seconds.copy(),
            load_seconds=self.load_seconds.copy(),
        )

    def audit(self) -> list[str]:
        """Every slot exactly one of free, saving, ready or quarantined; the pins are the sessions'
        loads in flight; the policy agrees."""
        problems = []
        states: dict[int, int] = {}
        for slot in [*self._free, *(slot for slots in self._quarantine.values() for slot in slots)]:
            states[slot] = states.get(slot, 0) + 1
        for slot, entry in enumerate(self._slots):
            if entry is None:
                continue
            states[slot] = states.get(slot, 0) + 1
            if self._entries.get(entry.block_hash) is not entry or entry.slot != slot:
                problems.append(f"store: slot {slot}'s entry is not indexed by its hash")
            if entry.pins and not entry.ready:
                problems.append(f"store: slot {slot} is pinned while saving")
        if len(self._entries) != sum(1 for entry in self._slots if entry is not None):
            problems.append("store: hashes index entries that no slot holds")
        lost = [slot for slot in range(self.num_slots) if states.get(slot) != 1]
        if lost:
            problems.append(f"store: slots {lost[:8]} are in {[states.get(slot, 0) for slot in lost[:8]]} states, not one")
        pins: dict[int, int] = {}
        for session in self.sessions:
            for slot, count in session.pins().items():
                pins[slot] = pins.get(slot, 0) + count
        held = {slot: entry.pins for slot, entry in enumerate(self._slots) if entry is not None and entry.pins}
        if held != pins:
            problems.append(f"store: pins {held} but the sessions have loads in flight {pins}")
        tracked = {slot: entry.block_hash for slot, entry in enumerate(self._slots) if entry is not None}
        evictable = [slot for slot, entry in enumerate(self._slots) if entry is not None and entry.ready and not entry.pins]
        return problems + [f"store: {problem}" for problem in self.policy.audit(evictable, tracked)]


class KVStoreIndexes:
    """The gateway's store indexes by store id: workers whose registrations name one id share it."""

    def __init__(self, policy: EvictionPolicyName) -> None:
        self.policy = policy
        self._indexes: dict[str, KVStoreIndex] = {}

    def for_store(self, store_id: str, num_slots: int, page_bytes: int = 0, context_cost: float = 0.0) -> KVStoreIndex | None:
        """The index of a worker's store (made for its first worker), or None for a worker without one.
        ValueError if the store was known with another size (then it is not the same arena)."""
        if not store_id or num_slots <= 0:
            return None
        problem = self.conflict(store_id, num_slots)
        if problem:
            raise ValueError(problem)
        index = self._indexes.get(store_id)
        if index is None:
            policy = make_policy(self.policy, num_slots, context_cost)
            index = self._indexes[store_id] = KVStoreIndex(store_id, num_slots, policy, page_bytes)
        return index

    def conflict(self, store_id: str, num_slots: int) -> str | None:
        """Why a worker reporting this store cannot join (None: it can)."""
        index = self._indexes.get(store_id)
        if index is not None and index.num_slots != num_slots:
            return f"KV store {store_id} has {index.num_slots} slots, a worker reports {num_slots}"
        return None

    def all(self) -> list[KVStoreIndex]:
        return list(self._indexes.values())
