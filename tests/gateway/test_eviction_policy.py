"""Eviction policies: the order each one evicts in, leaf first, aging; and a hypothesis check of every
policy against a brute-force reference over random sequences of tier events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.gateway.eviction_policy import EvictionPolicy, make_policy


def drain(policy: EvictionPolicy) -> list[int]:
    victims = []
    while (key := policy.victim()) is not None:
        policy.untrack(key)
        victims.append(key)
    return victims


def tracked(policy: EvictionPolicy, entries: list[tuple[int, int, int | None, int]]) -> EvictionPolicy:
    """Track (key, hash, parent hash, depth) entries, then release them in that order."""
    for key, block_hash, parent, depth in entries:
        policy.track(key, block_hash, parent, depth)
    for key, *_ in entries:
        policy.release(key)
    return policy


def test_lru_evicts_the_least_recently_released_and_held_entries_never() -> None:
    policy = tracked(make_policy("lru", 4), [(0, 10, None, 0), (1, 11, None, 0), (2, 12, None, 0), (3, 13, None, 0)])
    policy.hold(1)
    policy.release(0)  # used again: now the most recent
    assert policy.order() == [2, 3, 0]
    assert drain(policy) == [2, 3, 0]
    assert policy.victim() is None


def test_a_parent_goes_after_its_children_in_every_policy() -> None:
    for name in ("lru", "lfu", "depth"):
        # A chain released head first: recency (and depth's cost, for the tail) would evict the head first.
        policy = tracked(make_policy(name, 3, context_cost=0.0), [(0, 10, None, 0), (1, 11, 10, 1), (2, 12, 11, 2)])
        assert drain(policy) == [2, 1, 0], name


def test_a_parent_whose_children_are_all_held_still_goes_when_nothing_else_can() -> None:
    policy = tracked(make_policy("lru", 3), [(0, 10, None, 0), (1, 11, 10, 1), (2, 20, None, 0)])
    policy.hold(1)  # the child is in use: its parent would strand it, so it waits behind key 2
    assert policy.victim() == 2
    policy.untrack(2)
    assert policy.victim() == 0  # the fallback: every evictable entry has children
    policy.untrack(0)
    assert policy.victim() is None


def test_an_unparked_parent_keeps_its_place() -> None:
    policy = tracked(make_policy("lru", 4), [(0, 10, None, 0), (1, 11, 10, 1), (2, 20, None, 0), (3, 30, None, 0)])
    assert policy.victim() == 1  # 0 has a child: parked; its child goes first
    policy.untrack(1)
    assert policy.victim() == 0  # back in line, still the oldest


def test_lfu_keeps_the_often_hit_and_ages_them_out() -> None:
    policy = tracked(make_policy("lfu", 3), [(0, 10, None, 0), (1, 11, None, 0)])
    for _ in range(3):
        policy.hold(0)
        policy.hit(0)
        policy.release(0)  # priority 0 + 4 hits
    assert policy.victim() == 1  # priority 0 + 1
    policy.untrack(1)
    assert policy.level == 1.0
    # Newcomers start at the level: after enough evictions a once-hot entry is the oldest and goes.
    key_of_newcomer = 1
    for round_ in range(4):
        policy.track(key_of_newcomer, 100 + round_, None, 0)
        policy.release(key_of_newcomer)
        victim = policy.victim()
        assert victim is not None
        policy.untrack(victim)
        if victim == 0:
            break
        key_of_newcomer = victim
    assert victim == 0


def test_depth_keeps_deep_blocks_longer_and_equals_fifo_without_context_cost() -> None:
    entries = [(0, 10, None, 8), (1, 11, None, 1), (2, 12, None, 4)]
    assert drain(tracked(make_policy("depth", 3, context_cost=0.5), entries)) == [1, 2, 0]
    assert drain(tracked(make_policy("depth", 3, context_cost=0.0), entries)) == [0, 1, 2]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("random", 4)  # type: ignore[arg-type]


class Reference:
    """The rule itself, by brute force: the lowest (priority, release order) among evictable entries
    without tracked children, else among all evictable ones."""

    def __init__(self, name: str, context_cost: float) -> None:
        self.name, self.context_cost = name, context_cost
        self.entries: dict[int, tuple[int, int | None, int]] = {}  # key -> (hash, parent, depth)
        self.hits: dict[int, int] = {}
        self.ranked: dict[int, tuple[float, int]] = {}  # evictable key -> (priority, tick)
        self.level = 0.0
        self.tick = 0

    def weight(self, key: int) -> float:
        if self.name == "lru":
            return 0.0
        if self.name == "lfu":
            return float(self.hits[key])
        return 1.0 + self.context_cost * self.entries[key][2]

    def release(self, key: int) -> None:
        self.tick += 1
        self.ranked[key] = (self.level + self.weight(key), self.tick)

    def victim(self) -> int | None:
        parents = {parent for _, parent, _ in self.entries.values() if parent is not None}
        leaves = [key for key in self.ranked if self.entries[key][0] not in parents]
        pool = leaves or list(self.ranked)
        if not pool:
            return None
        key = min(pool, key=self.ranked.__getitem__)
        priority = self.ranked.pop(key)[0]
        if self.name != "lru":
            self.level = max(self.level, priority)
        return key


EVENTS = st.lists(
    st.tuples(st.sampled_from(["track", "untrack", "release", "hold", "hit", "victim"]), st.integers(0, 7), st.integers(0, 7)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["lru", "lfu", "depth"]), events=EVENTS)
def test_every_policy_matches_the_reference(name: str, events: list[tuple[str, int, int]]) -> None:
    policy = make_policy(name, 8, context_cost=0.25)  # type: ignore[arg-type]
    reference = Reference(name, 0.25)
    next_hash = 1000
    for event, key, other in events:
        known = key in reference.entries
        if event == "track" and not known:
            # parent: the hash another tracked key holds (a chain), or none
            parent = reference.entries[other][0] if other in reference.entries and other != key else None
            next_hash += 1
            depth = other
            policy.track(key, next_hash, parent, depth)
            reference.entries[key] = (next_hash, parent, depth)
            reference.hits[key] = 1
        elif event == "untrack" and known:
            policy.untrack(key)
            del reference.entries[key]
            reference.ranked.pop(key, None)
        elif event == "release" and known:
            policy.release(key)
            reference.release(key)
        elif event == "hold" and known:
            policy.hold(key)
            reference.ranked.pop(key, None)
        elif event == "hit" and known:
            policy.hit(key)
            reference.hits[key] += 1
        elif event == "victim":
            expected = reference.victim()
            assert policy.victim() == expected
            if expected is not None:
                policy.untrack(expected)
                del reference.entries[expected]
        tracked_hashes = {k: h for k, (h, _, _) in reference.entries.items()}
        assert policy.audit(reference.ranked, tracked_hashes) == []
        assert policy.level == reference.level
