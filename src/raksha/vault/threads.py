"""Threads the process keeps for its next task: one that has run its task waits for another.

A live VM's small incremental starts about twenty short-lived threads (the pipeline's readers and workers,
the pack's writer, the pull job's end, the pre-freeze hooks' side thread...). Each start costs 0.1-1 ms
on two cores shared with QEMU and libvirtd, and most of them lie on the run's path: started anew, the
pipeline's ten alone cost such a run 5-7 ms of its ~120 (performance.md §29). A thread kept waiting costs
its stack's touched pages and nothing else.

Unlike a ``ThreadPoolExecutor``, a task never queues behind another: with no thread waiting, a new one
starts. So a task may wait for tasks it spawned, at any depth, without a deadlock.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

KEEP = 32  # threads left waiting at most; beyond, a thread that ends its task ends too

_Task = tuple[Callable[[], Any], "Future[Any]", str]

# What a module keeps per thread outside a task's objects (a read buffer in a module-level
# ``threading.local``, a C library's last error), dropped by each thread as its task ends.
_FORGET: list[Callable[[], None]] = []


def forget_after_each_task(fn: Callable[[], None]) -> None:
    """Have every kept thread call ``fn`` once its task has returned, before the task's future is done: a
    thread waiting for its next task holds nothing of the last one, as a thread that ended would not."""
    _FORGET.append(fn)


def _forget() -> None:
    for fn in _FORGET:
        try:
            fn()
        except Exception:  # nothing to forget is no reason to fail the task that ran
            pass


class _Threads:
    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has none of the parent's threads

    def _reset(self) -> None:
        self._lock = threading.Lock()  # in a child, one a parent's thread held as it forked stays held
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self.waiting = 0  # threads blocked on ``_tasks``, or about to be

    def spawn(self, fn: Callable[[], T], name: str) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            reuse = self.waiting > 0
            if reuse:
                self.waiting -= 1
        # Through the queue also for a new thread: a Thread keeps its arguments until its target returns.
        self._tasks.put((fn, future, name))
        if not reuse:
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            fn: Callable[[], Any] | None
            fn, future, name = self._tasks.get()
            threading.current_thread().name = name
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:
                    fn = None  # what the task held is let go before anyone is told it ended
                    _forget()
                    future.set_exception(exc)
                else:
                    fn = None
                    _forget()
                    future.set_result(result)
                    del result
            del fn, future
            threading.current_thread().name = "raksha-idle"
            with self._lock:
                if self.waiting >= self._keep:
                    return
                self.waiting += 1


_THREADS = _Threads(KEEP)


def spawn(fn: Callable[[], T], *, name: str) -> Future[T]:
    """Run ``fn`` in a thread of its own: a waiting one, else a new one (a daemon: it does not hold up
    the process's exit). The future is done once the thread holds nothing of ``fn`` or its result."""
    return _THREADS.spawn(fn, name)


def waiting() -> int:
    """How many threads wait for a task now."""
    return _THREADS.waiting
