"""Telling whether the owner of something left behind still runs, when its pid may have been reused."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from raksha.vault.processes import alive, owner_alive, started_at


def test_this_process_is_alive_and_owns_what_it_made_now() -> None:
    assert alive(os.getpid())
    start = started_at(os.getpid())
    assert start is not None and start <= time.time()
    assert owner_alive(os.getpid(), time.time())


def test_a_zombie_and_a_reaped_child_are_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while alive(child.pid):  # exited but not reaped: a zombie, holding nothing
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait()
    assert not alive(child.pid) and not owner_alive(child.pid, time.time())


def test_a_process_younger_than_the_thing_is_not_its_owner() -> None:
    """As when a dead owner's pid was given to a new process: a lock made an hour ago is not this one's."""
    made = time.time() - 3600
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert alive(proc.pid)
        assert not owner_alive(proc.pid, made)
        assert owner_alive(proc.pid, time.time())
    finally:
        proc.kill()
        proc.wait()


def test_nonsense_pids_are_no_owners() -> None:
    assert not owner_alive(0, time.time()) and not owner_alive(-1, time.time())
    assert not alive(2**22 + 12345)
