"""`pagedd serve`'s hold on its host KV store arena: one server per store name, a crashed run's
leftovers removed at the next start, the arena removed at exit."""

from __future__ import annotations


import pytest

from paged.gateway.kv_store_lease import KVStoreLease
from paged.shared.kv_store_path import store_path
from paged.shared.startup_failure import StartupError


def test_a_crashed_runs_arena_and_drafts_are_removed_and_the_arena_goes_at_exit(store_name: str) -> None:
    path = store_path(store_name)
    path.write_bytes(b"a crashed run's arena")
    draft = path.with_name(f".{store_name}.1234.abcd")
    draft.write_bytes(b"half written")
    lease = KVStoreLease(store_name)
    lease.acquire()
    assert not path.exists() and not draft.exists()
    path.write_bytes(b"the workers' arena")
    lease.release()
    assert not path.exists() and not lease.lock_path.exists()
    lease.release()  # twice is harmless


def test_a_second_server_cannot_take_a_store_in_use(store_name: str) -> None:
    first = KVStoreLease(store_name)
    first.acquire()
    try:
        with pytest.raises(StartupError, match=f"KV store {store_name} is in use by pagedd serve pid"):
            KVStoreLease(store_name).acquire()
    finally:
        first.release()
    second = KVStoreLease(store_name)
    second.acquire()  # free again once the first let go
    second.release()


def test_a_bad_name_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="bad KV store name"):
        KVStoreLease("a/b")
