"""A small worker pool: N threads pull items, the first error stops everyone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def run_parallel(items: Iterable[T], work: Callable[[T], None], threads: int) -> None:
    """Call ``work`` on every item from ``threads`` threads; re-raise the first exception.

    Each thread holds one item at a time, so memory stays bounded by ``threads``
    items whatever the disk size.
    """
    it: Iterator[T] = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []
    ended = [threading.Event() for _ in range(threads)]

    def loop(end: threading.Event) -> None:
        try:
            while not errors:
                with lock:
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                try:
                    work(item)
                except BaseException as exc:
                    errors.append(exc)
                    return
        finally:
            end.set()

    pool = [threading.Thread(target=loop, args=(end,), name=f"raksha-worker-{i}", daemon=True)
            for i, end in enumerate(ended)]
    for t in pool:
        t.start()
    try:
        for t in pool:
            while t.is_alive():
                t.join(0.5)  # short joins keep Ctrl-C responsive
    except BaseException as exc:
        errors.append(exc)
        # Wait for every worker to finish its item before the caller closes what they write to.
        # Not with Thread.join: a join interrupted by a signal handler's exception can leave a thread
        # that is still running marked as stopped (seen with CPython 3.11.2), and join returns at once.
        while not all(end.is_set() for end in ended):
            try:
                time.sleep(0.01)
            except BaseException:
                continue  # another signal: the workers stop after their current item anyway
        raise
    if errors:
        raise errors[0]
