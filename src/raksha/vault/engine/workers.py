"""A small worker pool: N threads pull items, the first error stops everyone."""

from __future__ import annotations

import threading
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

    def loop() -> None:
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

    pool = [threading.Thread(target=loop, name=f"raksha-worker-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        for t in pool:
            while t.is_alive():
                t.join(0.5)  # short joins keep Ctrl-C responsive
    except BaseException as exc:
        errors.append(exc)
        for t in pool:
            t.join()
        raise
    if errors:
        raise errors[0]
