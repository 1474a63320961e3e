"""Whether a vault's recent verification passes read every pack, and since when. Pure, no I/O.

The service verifies a vault one group of packs at a time (``n/t``, services/verification.py): each
pass reads the data of its group and checks the other packs only for presence and size. A backup is
*verified* once passes that all began after it was finished have read every pack between them: every
chunk it uses was then re-read and re-hashed at least once, and no pass of those named it damaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from raksha.domain.data_subset import DataSubset

#: Passes a vault service keeps (newest first): enough for a cycle of up to this many groups.
KEPT_PASSES = 64


@dataclass(frozen=True)
class VerifyPass:
    """One verification pass over a vault, as the service keeps it."""

    started_at: datetime
    finished_at: datetime
    data_subset: str | None  # "n/t" or "p%": whose packs' data it read; None: every pack's
    ok: bool
    damaged_backups: Mapping[str, str]  # backup id -> the first reason it was named damaged
    summary: Mapping[str, Any]  # the report's counts (backups_checked, packs_checked, packs_not_read...)

    def to_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at.isoformat(), "finished_at": self.finished_at.isoformat(),
                "data_subset": self.data_subset, "ok": self.ok, "damaged_backups": dict(self.damaged_backups),
                **self.summary}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VerifyPass:
        known = {"started_at", "finished_at", "data_subset", "ok", "damaged_backups"}
        return cls(datetime.fromisoformat(d["started_at"]), datetime.fromisoformat(d["finished_at"]),
                   d.get("data_subset"), bool(d["ok"]), dict(d.get("damaged_backups") or {}),
                   {k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class Coverage:
    since: datetime  # the passes that read every pack began at or after this
    damaged_backups: frozenset[str]  # the backups those passes named damaged


def coverage(passes: Sequence[VerifyPass]) -> Coverage | None:
    """The newest passes (``passes`` newest first) that read every pack between them; None if none did.

    A pass of every pack covers alone; ``n/t`` passes cover once the newest of each of the t groups is
    there (a change of t starts a new cycle); a ``p%`` pass reads packs at random, so it neither
    completes nor breaks a cycle, but the damage it names counts."""
    groups: int | None = None
    seen: set[int] = set()
    damaged: set[str] = set()
    for p in passes:
        damaged.update(p.damaged_backups)
        if p.data_subset is None:
            return Coverage(p.started_at, frozenset(damaged))
        subset = DataSubset.parse(p.data_subset)
        if subset.percent < 100:
            continue
        if groups is None:
            groups = subset.groups
        elif subset.groups != groups:
            return None
        seen.add(subset.group)
        if len(seen) == groups:
            return Coverage(p.started_at, frozenset(damaged))
    return None


def newest_first(new: VerifyPass, kept: Iterable[Mapping[str, Any]] | None) -> list[VerifyPass]:
    """The passes a vault service keeps after ``new``: it, then the ones kept before, at most KEPT_PASSES.
    A kept entry that does not read as a pass (edited by hand) is dropped: it can only delay an ``ok``."""
    older = []
    for d in kept or []:
        try:
            older.append(VerifyPass.from_dict(d))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return [new, *older][:KEPT_PASSES]
