"""Progress reporting shared by long operations (backup, restore, verify, gc)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    phase: str
    done: int  # bytes, or items of ``unit``
    total: int
    elapsed: float
    unit: str = "B"  # "B" for bytes, else what is counted ("backups")

    @property
    def fraction(self) -> float:
        # At most 1: a total can be an estimate (verify of a data subset learns its packs as it goes).
        return min(1.0, self.done / self.total) if self.total else 1.0

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return max(0, self.total - self.done) / rate if rate > 0 else None


ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Thread-safe counter that calls back at most every ``interval`` seconds (and at the end)."""

    def __init__(self, phase: str, total: int, callback: ProgressCallback | None, interval: float = 0.2,
                 unit: str = "B") -> None:
        self.phase = phase
        self.unit = unit
        self.total = total
        self.done = 0
        self._callback = callback
        self._interval = interval
        self._start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self._callback is None or now - self._last < self._interval:
                return
            self._last = now
            event = ProgressEvent(self.phase, self.done, self.total, now - self._start, self.unit)
        self._callback(event)

    def adjust_total(self, delta: int) -> None:
        """The work turned out ``delta`` larger (or, negative, smaller) than the total first given."""
        with self._lock:
            self.total += delta

    def finish(self) -> None:
        if self._callback is not None:
            self._callback(ProgressEvent(self.phase, self.done, self.total, time.monotonic() - self._start,
                                         self.unit))
