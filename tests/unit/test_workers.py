"""The engine's worker pools: every item done once, memory bounded by the buffer pool, first error wins."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import pytest

from raksha.vault import threads
from raksha.vault.engine.workers import BufferPool, Drain, run_parallel, run_pipeline


def test_run_parallel_does_every_item_once() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            seen.append(i)

    run_parallel(range(1000), work, 4)
    assert sorted(seen) == list(range(1000))


def test_pipeline_fills_then_works_every_item_once_in_its_own_buffer() -> None:
    buffers = [bytearray(8) for _ in range(3)]
    done: dict[int, bytes] = {}
    in_flight = [0]
    most = [0]
    lock = threading.Lock()

    def fill(i: int, buf: bytearray) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        buf[:8] = i.to_bytes(8, "big")
        return i * 2

    def work(i: int, buf: bytearray, filled: int) -> None:
        assert filled == i * 2
        time.sleep(0.0005)  # the buffer is not refilled under us
        with lock:
            done[i] = bytes(buf)
            in_flight[0] -= 1

    run_pipeline(range(500), fill, work, buffers, readers=2, workers=3)
    assert done == {i: i.to_bytes(8, "big") for i in range(500)}
    assert most[0] <= len(buffers)  # never more items in flight than buffers


@pytest.mark.parametrize("stage", ["fill", "work"])
def test_pipeline_stops_at_the_first_error_and_raises_it(stage: str) -> None:
    calls = [0]
    lock = threading.Lock()

    def fill(i: int, buf: bytearray) -> None:
        if stage == "fill" and i == 50:
            raise ValueError("bad read")

    def work(i: int, buf: bytearray, filled: None) -> None:
        with lock:
            calls[0] += 1
        if stage == "work" and i == 50:
            raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad"):
        run_pipeline(range(100_000), fill, work, [bytearray(1) for _ in range(4)], readers=2, workers=2)
    assert calls[0] < 1000  # stopped early, not after every item


def test_the_pipeline_says_once_when_every_item_is_filled_and_not_when_a_fill_failed() -> None:
    """A live VM's backup job starts ending as soon as the source is read whole, while the workers finish."""
    fills, works, said = [0], [0], []
    lock = threading.Lock()
    release = threading.Event()

    def fill(i: int, buf: bytearray) -> None:
        with lock:
            fills[0] += 1

    def work(i: int, buf: bytearray, filled: None) -> None:
        if i == 99:
            assert release.wait(5)  # the last item's work waits until the pipeline has said it
        with lock:
            works[0] += 1

    def all_filled() -> None:
        said.append((fills[0], works[0]))
        release.set()

    run_pipeline(range(100), fill, work, [bytearray(1) for _ in range(4)], readers=3, workers=2,
                 all_filled=all_filled)
    assert len(said) == 1 and said[0][0] == 100 and said[0][1] < 100

    def bad_fill(i: int, buf: bytearray) -> None:
        if i == 7:
            raise ValueError("bad read")

    said.clear()
    with pytest.raises(ValueError):
        run_pipeline(range(100), bad_fill, lambda i, b, f: None, [bytearray(1) for _ in range(4)], readers=3,
                     workers=2, all_filled=lambda: said.append((0, 0)))
    assert said == []


def test_pipeline_with_no_items_returns() -> None:
    run_pipeline([], lambda i, b: None, lambda i, b, f: None, [bytearray(1)], readers=3, workers=2)


def test_the_next_pool_runs_in_the_threads_the_last_one_left_and_they_keep_nothing_of_it() -> None:
    class Held:  # what a backup's loops hold: buffers, a source
        pass

    def threads_of_a_run(held: Held | None = None) -> set[int]:
        seen: set[int] = set()
        lock = threading.Lock()
        all_four = threading.Barrier(4, timeout=30)  # the first four items wait for each other: four threads

        def work(i: int) -> None:
            if i < 4:
                all_four.wait()
            with lock:
                seen.add(threading.get_ident())
                assert held is None or isinstance(held, Held)

        run_parallel(range(40), work, 4)
        return seen

    held = Held()
    first = threads_of_a_run(held)
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is None  # the waiting threads dropped the loops that referred to it
    assert len(first) == 4
    waiting = {t.ident for t in threading.enumerate()}
    assert threads_of_a_run() <= waiting  # no new thread started


def test_a_kept_thread_holds_no_read_buffer_of_its_last_task(tmp_path: Path) -> None:
    from raksha.vault import directio

    path = tmp_path / "pack"
    path.write_bytes(os.urandom(256 << 10))

    def read() -> weakref.ref[mmap.mmap]:  # as a verify's thread reads a pack's piece
        assert directio.pread_direct(path, 4096, 128 << 10) in (None, path.read_bytes()[4096 : 4096 + (128 << 10)])
        buf = getattr(directio._local, "buf", None)
        if buf is None:
            pytest.skip("no O_DIRECT on this filesystem: no per-thread buffer")
        return weakref.ref(buf)

    ref = threads.spawn(read, name="raksha-test-read").result(timeout=30)
    assert ref() is None  # unmapped as the task ended, not kept while the thread waits


def test_a_kept_thread_holds_no_libvirt_error_of_its_last_task() -> None:
    libvirt = pytest.importorskip("libvirt")
    import raksha.hypervisor.errors  # noqa: F401  (it has the threads forget libvirt's last error)

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # Every waiting thread, and two more, each run a task at once: a failed libvirt call...
    k = min(threads.waiting() + 2, threads.KEEP)
    together = threading.Barrier(k, timeout=30)
    one_at_a_time = threading.Lock()  # the barrier makes the threads distinct; the calls need not overlap
    with pytest.raises(libvirt.libvirtError):  # libvirt's and libxml2's first use, in one thread (CI hung once)
        libvirt.open("test:///no/such/file.xml")

    def fail() -> None:
        together.wait()
        with one_at_a_time, pytest.raises(libvirt.libvirtError):
            libvirt.open("test:///no/such/file.xml")  # the test driver: no daemon needed
        assert libvirt.virGetLastError() is not None

    for f in [threads.spawn(fail, name="raksha-test-fail") for _ in range(k)]:
        f.result(timeout=30)
    deadline = time.monotonic() + 10
    while threads.waiting() < k and time.monotonic() < deadline:
        time.sleep(0.001)
    # ...then as many at once, which find those threads waiting: an error built by hand says its own message.
    again = threading.Barrier(k, timeout=30)

    def built_by_hand() -> str:
        again.wait()
        return str(libvirt.libvirtError("refused by a test"))

    said = {f.result(timeout=30) for f in [threads.spawn(built_by_hand, name="raksha-test-built") for _ in range(k)]}
    assert said == {"refused by a test"}


def test_a_forked_child_starts_its_own_threads() -> None:
    run_parallel(range(8), lambda _i: None, 2)
    deadline = time.monotonic() + 10
    while threads.waiting() < 1 and time.monotonic() < deadline:  # its threads wait in the parent
        time.sleep(0.001)
    pid = os.fork()
    if pid == 0:  # the child has none of them: a pool that waited for them would hang
        try:
            run_parallel(range(8), lambda _i: None, 2)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if waited[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child's pool waited for its parent's threads")
    assert os.waitstatus_to_exitcode(waited[1]) == 0


def test_a_drain_runs_every_job_and_join_waits_for_them() -> None:
    done: list[int] = []
    lock = threading.Lock()
    drain = Drain(2)

    def job(i: int) -> None:
        time.sleep(0.001)
        with lock:
            done.append(i)

    for i in range(50):
        drain.submit(lambda i=i: job(i))
    drain.join()
    assert sorted(done) == list(range(50))
    drain.submit(lambda: job(50))
    drain.close()
    assert sorted(done) == list(range(51))


def test_a_failed_job_stops_the_drain_and_reaches_the_producer() -> None:
    ran: list[int] = []
    drain = Drain(1)
    gate = threading.Event()

    def fail() -> None:
        gate.wait(5)
        raise OSError(28, "no space left on device")

    drain.submit(fail)
    for i in range(5):
        drain.submit(lambda i=i: ran.append(i))  # queued behind the failure: dropped
    gate.set()
    with pytest.raises(OSError, match="no space"):
        drain.join()
    assert ran == []
    with pytest.raises(OSError, match="no space"):
        drain.submit(lambda: ran.append(9))
    with pytest.raises(OSError, match="no space"):
        drain.close()


def test_an_aborted_drain_drops_what_waits_and_raises_nothing() -> None:
    ran: list[int] = []
    drain = Drain(1)
    gate = threading.Event()
    drain.submit(lambda: gate.wait(5))
    for i in range(5):
        drain.submit(lambda i=i: ran.append(i))
    threading.Timer(0.05, gate.set).start()
    drain.close(abort=True)
    assert ran == []


def test_a_producer_waiting_for_a_buffer_gets_the_drains_error_instead() -> None:
    """A consumer that failed gives no buffer back: the producer must not wait for one forever."""
    pool: BufferPool[bytearray] = BufferPool([bytearray(1)])
    drain = Drain(1)
    buf = pool.take(drain)
    drain.submit(lambda: (_ for _ in ()).throw(ValueError("decode failed")))
    with pytest.raises(ValueError, match="decode failed"):
        pool.take(drain)  # the one buffer is held; the drain failed
    pool.give(buf)
    drain.close(abort=True)
