"""Vault locks over the memory and local backends."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raksha.domain.errors import BackendError, InvalidInput, RakshaError, VaultLocked
from raksha.vault.backends.base import Backend
from raksha.vault.backends.local import LocalBackend
from raksha.vault.backends.memory import MemoryBackend
from raksha.vault.locks import LockInfo, LockKind, LockManager

SHARED, MAINTENANCE, EXCLUSIVE = LockKind.SHARED, LockKind.MAINTENANCE, LockKind.EXCLUSIVE
T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend
    b = MemoryBackend() if request.param == "memory" else LocalBackend(tmp_path / "vault", create=True)
    yield b
    b.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def manager(backend: Backend, clock: FakeClock | None = None, **kwargs: Any) -> LockManager:
    return LockManager(backend, clock=clock or FakeClock(), **kwargs)


def lock_keys(backend: Backend) -> set[str]:
    return {o.key for o in backend.list("locks/")}


def stored(backend: Backend, key: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(backend.get(key))
    return doc


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_is_a_json_object_under_locks_and_release_deletes_it(
    backend: Backend, clock: FakeClock
) -> None:
    mgr = manager(backend, clock, host="node1", pid=4242)
    with mgr.acquire(SHARED, "backup job1/run1/vm1/vda", {"vault": "v1"}) as lock:
        assert lock_keys(backend) == {lock.key}
        assert lock.key == f"locks/{lock.info.id}" and len(lock.info.id) == 32
        int(lock.info.id, 16)
        assert stored(backend, lock.key) == {
            "version": 1, "id": lock.info.id, "kind": "shared", "operation": "backup job1/run1/vm1/vda",
            "host": "node1", "pid": 4242, "created": T0, "refreshed": T0, "extra": {"vault": "v1"},
        }
    assert lock_keys(backend) == set()
    assert lock.released


def test_two_shared_locks_coexist(backend: Backend) -> None:
    mgr = manager(backend)
    with mgr.acquire(SHARED, "backup a"), mgr.acquire(SHARED, "restore b"):
        assert sorted(i.operation for i in mgr.active()) == ["backup a", "restore b"]


def test_maintenance_coexists_with_shared_both_ways(backend: Backend) -> None:
    mgr = manager(backend)
    with mgr.acquire(SHARED, "backup a"), mgr.acquire(MAINTENANCE, "gc"), mgr.acquire(SHARED, "verify b"):
        assert len(mgr.active()) == 3


def test_a_second_maintenance_lock_is_refused_naming_the_holder(backend: Backend, clock: FakeClock) -> None:
    holder = manager(backend, clock, host="node-a", pid=4242)
    with holder.acquire(MAINTENANCE, "gc", {"phase": "mark"}) as held:
        clock.now = T0 + 125
        with pytest.raises(VaultLocked) as exc:
            manager(backend, clock, host="node-b", pid=7).acquire(MAINTENANCE, "prune job1")
        err = exc.value
        assert err.code == "VAULT_LOCKED" and err.retryable
        assert "'gc'" in err.message and "node-a" in err.message and "4242" in err.message
        assert "125s" in err.message
        assert err.details == {"lock_id": held.info.id, "kind": "maintenance", "operation": "gc",
                               "host": "node-a", "pid": 4242, "age": 125.0, "wanted": "maintenance"}
        # The refused acquirer left nothing behind.
        assert lock_keys(backend) == {held.key}


def test_exclusive_conflicts_with_shared_in_both_directions(backend: Backend) -> None:
    mgr = manager(backend)
    with mgr.acquire(SHARED, "backup a"), pytest.raises(VaultLocked):
        mgr.acquire(EXCLUSIVE, "upgrade")
    with mgr.acquire(EXCLUSIVE, "upgrade"):
        for kind in LockKind:
            with pytest.raises(VaultLocked, match=r"exclusive lock .* for 'upgrade'"):
                mgr.acquire(kind, "anything")
    assert lock_keys(backend) == set()


def test_a_stale_lock_is_removed_and_does_not_block(backend: Backend, clock: FakeClock) -> None:
    crashed = manager(backend, clock, host="gone-host", pid=99)
    old = crashed.acquire(MAINTENANCE, "gc")
    clock.now = T0 + 1800.5  # not refreshed for longer than stale_after
    mgr = manager(backend, clock, host="node-b", pid=7)
    assert mgr.active() == []
    with mgr.acquire(MAINTENANCE, "gc") as lock:
        assert lock_keys(backend) == {lock.key}
    old.release()  # the crashed holder's object is already gone; releasing is still fine


def test_a_lock_refreshed_just_within_stale_after_still_blocks(backend: Backend, clock: FakeClock) -> None:
    holder = manager(backend, clock, host="node-a", pid=99).acquire(MAINTENANCE, "gc")
    clock.now = T0 + 1799
    with pytest.raises(VaultLocked):
        manager(backend, clock, host="node-b", pid=7).acquire(MAINTENANCE, "gc")
    holder.release()


def test_a_lock_of_a_dead_process_on_this_host_does_not_block(backend: Backend) -> None:
    pid = dead_pid()
    ghost = manager(backend, host=socket.gethostname(), pid=pid).acquire(EXCLUSIVE, "upgrade")
    mgr = manager(backend, host=socket.gethostname())
    with mgr.acquire(MAINTENANCE, "gc") as lock:
        assert lock_keys(backend) == {lock.key}
    ghost.release()


def test_a_dead_pid_number_on_another_host_says_nothing_and_still_blocks(backend: Backend) -> None:
    other = manager(backend, host="not-" + socket.gethostname(), pid=dead_pid()).acquire(EXCLUSIVE, "upgrade")
    with pytest.raises(VaultLocked):
        manager(backend, host=socket.gethostname()).acquire(SHARED, "backup")
    other.release()


def test_release_is_idempotent(backend: Backend) -> None:
    mgr = manager(backend)
    lock = mgr.acquire(MAINTENANCE, "gc")
    lock.release()
    lock.release()
    with lock:
        pass  # leaving the context after an explicit release is fine too
    assert lock_keys(backend) == set()
    with mgr.acquire(MAINTENANCE, "gc again"):
        pass


def test_refresh_updates_the_timestamp_and_keeps_the_rest(backend: Backend, clock: FakeClock) -> None:
    with manager(backend, clock).acquire(SHARED, "backup a", {"n": 1}) as lock:
        clock.now = T0 + 300
        lock.refresh()
        doc = stored(backend, lock.key)
        assert doc["refreshed"] == T0 + 300 and doc["created"] == T0 and doc["extra"] == {"n": 1}
        assert lock.info.refreshed == T0 + 300
    lock.refresh()  # released: must not bring the object back
    assert lock_keys(backend) == set()


def test_refreshing_keeps_a_long_holder_from_going_stale(backend: Backend, clock: FakeClock) -> None:
    holder = manager(backend, clock, host="node-a", pid=99).acquire(MAINTENANCE, "gc")
    for _ in range(10):
        clock.now += 1000
        holder.refresh()
    with pytest.raises(VaultLocked):
        manager(backend, clock, host="node-b", pid=7).acquire(MAINTENANCE, "prune")
    holder.release()


def test_update_extra_merges_and_rewrites(backend: Backend, clock: FakeClock) -> None:
    mgr = manager(backend, clock)
    with mgr.acquire(MAINTENANCE, "gc", {"phase": "mark", "vault": "v1"}) as lock:
        clock.now = T0 + 5
        lock.update_extra({"phase": "sweep", "condemned": ["a", "b"]})
        doc = stored(backend, lock.key)
        assert doc["extra"] == {"phase": "sweep", "vault": "v1", "condemned": ["a", "b"]}
        assert doc["refreshed"] == T0 + 5
        assert mgr.active()[0].extra["phase"] == "sweep"
    with pytest.raises(RakshaError) as exc:
        lock.update_extra({"x": 1})
    assert exc.value.code == "LOCK_RELEASED"


def test_the_background_thread_refreshes_while_held_and_stops_on_release(backend: Backend) -> None:
    mgr = LockManager(backend, refresh_interval=0.02, stale_after=60)
    lock = mgr.acquire(SHARED, "backup a")
    first = stored(backend, lock.key)["refreshed"]
    deadline = time.monotonic() + 5
    while stored(backend, lock.key)["refreshed"] == first:
        assert time.monotonic() < deadline, "lock was never refreshed"
        time.sleep(0.01)
    lock.release()
    time.sleep(0.1)
    assert lock_keys(backend) == set()  # no late refresh recreated it


def test_junk_under_locks_is_ignored_and_left_alone(backend: Backend, clock: FakeClock) -> None:
    lock_like = "locks/" + "ab" * 16
    junk = {
        "locks/" + "cd" * 16 + ".condemned": b"\x00\x01 binary gc data",
        "locks/garbage": b"{not json",
        lock_like: b"[1, 2, 3]",
        "locks/" + "ef" * 16: json.dumps({"version": 1, "id": "ef" * 16, "kind": "nope", "operation": "x",
                                          "host": "h", "pid": 1, "created": 0, "refreshed": 0,
                                          "extra": {}}).encode(),
        "locks/" + "12" * 16: json.dumps({"version": 99, "id": "12" * 16}).encode(),
        "locks/sub/" + "34" * 16: b"{}",
    }
    for key, data in junk.items():
        backend.put(key, data)
    mgr = manager(backend, clock)
    with mgr.acquire(EXCLUSIVE, "upgrade") as lock:
        assert mgr.active() == [lock.info]
    assert lock_keys(backend) == set(junk)


def test_lock_json_under_a_non_lock_name_is_not_a_lock(backend: Backend, clock: FakeClock) -> None:
    blocker = manager(backend, clock).acquire(EXCLUSIVE, "upgrade")
    backend.put(blocker.key + ".condemned", backend.get(blocker.key))
    blocker.release()
    with manager(backend, clock).acquire(EXCLUSIVE, "again"):
        pass
    assert lock_keys(backend) == {blocker.key + ".condemned"}


def test_active_lists_live_locks_oldest_first_and_filters_by_kind(backend: Backend, clock: FakeClock) -> None:
    mgr = manager(backend, clock, host="node-a", pid=1)
    clock.now = T0 + 2000
    a = mgr.acquire(SHARED, "backup a")
    clock.now = T0 + 2001
    gc = mgr.acquire(MAINTENANCE, "gc")
    stale_id = "5a" * 16
    stale = LockInfo("locks/" + stale_id, stale_id, SHARED, "old backup", "node-a", 1, T0, T0, {})
    backend.put(stale.key, stale.to_json())
    assert [i.operation for i in mgr.active()] == ["backup a", "gc"]
    assert mgr.active([MAINTENANCE]) == [gc.info]
    assert mgr.active([SHARED, EXCLUSIVE]) == [a.info]
    assert stale.key in lock_keys(backend)  # active() only reads
    clock.now = T0 - 10  # from the stale lock's time, all three are live
    assert [i.operation for i in mgr.active()] == ["old backup", "backup a", "gc"]
    for lock in (a, gc):
        lock.release()


def test_a_lock_released_between_list_and_get_is_ignored(backend: Backend) -> None:
    mgr = manager(backend)
    other = mgr.acquire(MAINTENANCE, "gc")

    class Vanishing:
        """Lists the lock, then it is gone when read."""

        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def get(self, key: str) -> bytes:
            if key == other.key:
                other.release()
            return backend.get(key)

    with LockManager(Vanishing(), clock=FakeClock()).acquire(MAINTENANCE, "prune") as lock:
        assert lock_keys(backend) == {lock.key}


def test_a_failure_while_checking_removes_our_own_lock(backend: Backend) -> None:
    class BrokenList:
        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def list(self, prefix: str = "") -> Iterator[Any]:
            raise BackendError("listing failed")

    with pytest.raises(BackendError):
        LockManager(BrokenList(), clock=FakeClock()).acquire(SHARED, "backup")
    assert lock_keys(backend) == set()


def test_racing_maintenance_acquirers_never_both_win(backend: Backend) -> None:
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def contender(n: int) -> None:
        mgr = LockManager(backend, host=f"node-{n}", pid=n + 1)
        barrier.wait()
        try:
            lock = mgr.acquire(MAINTENANCE, f"gc {n}")
        except VaultLocked:
            return
        winners.append(lock.key)
        time.sleep(0.05)  # hold it while the others look
        lock.release()

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) <= 1
    assert lock_keys(backend) == set()


def test_refresh_interval_must_be_shorter_than_stale_after(backend: Backend) -> None:
    with pytest.raises(InvalidInput):
        LockManager(backend, refresh_interval=600, stale_after=300)
    with pytest.raises(InvalidInput):
        LockManager(backend, refresh_interval=0)
