"""Scheduled verification of the service's vaults, a part of their data each time.

A vault's damage (a flipped bit on the disk under it, a pack lost to a bad restore of the vault's own
filesystem) should be found while the backups that need the damaged chunks can still be taken again,
not on the day of a restore. Re-reading a large vault every night is too much I/O, so each run reads
one of ``groups`` groups of packs (``raksha vault verify --read-data-subset n/t``) and checks every
other pack for presence and size: every pack's data is read once every ``groups`` intervals (by
default a week). Runs fall on the clock's multiples of the interval (daily: 00:00 UTC) and the group
follows the clock, so a server restarted more often than the interval still verifies, and goes on with
the next group.
Each pass is kept on the vault service (its recent passes) and said on the runs stored there
(``backupjobruns.verify_state``): a run with a backup the pass named is ``damaged`` at once; once the
recent passes have read every pack between them, every run finished before they began and named by none
is ``ok`` (raksha.domain.verify_coverage). A pass that finds damage also logs it as an error naming the
damaged backups; ``last_verify`` keeps each vault's last report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from raksha.db import Database
from raksha.db import api as db
from raksha.db.types import utcnow
from raksha.domain.data_subset import DataSubset
from raksha.domain.verify_coverage import VerifyPass
from raksha.services import vaults
from raksha.vault.operations.verify import VerifyReport, verify_vault
from raksha.vault.repository import Vault

LOG = logging.getLogger(__name__)


class Verifier:
    def __init__(self, database: Database, *, interval: float = 86400.0, groups: int = 7,
                 clock: Callable[[], float] = time.time) -> None:
        if groups < 1:
            raise ValueError("groups must be at least 1")
        self.db = database
        self.interval = interval  # 0: never on a timer
        self.groups = groups
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The last run's report per vault service id (for tests and logs).
        self.last_verify: dict[str, dict[str, Any]] = {}

    def subset(self) -> DataSubset:
        """This interval's group of packs: consecutive intervals take consecutive groups."""
        period = int(self.clock() // self.interval) if self.interval else 0
        return DataSubset.parse(f"{period % self.groups + 1}/{self.groups}")

    def verify_all(self) -> dict[str, dict[str, Any]]:
        """Verify this interval's group of every local vault that exists; returns each vault service's report."""
        subset = self.subset()

        def one(vault: Vault) -> tuple[datetime, VerifyReport]:
            started = utcnow()
            return started, verify_vault(vault, subset=subset, threads=1)  # beside backups: one pack at a time

        reports: dict[str, dict[str, Any]] = {}
        for row, (started, report) in vaults.on_local_vaults(self.db, "verify", one):
            LOG.log(logging.INFO if report.ok else logging.ERROR, "vault service %s: %s", row.name, report.summary())
            done = report.to_dict()
            with self.db.begin() as s:
                db.record_verification(s, row.id, VerifyPass(
                    started, utcnow(), subset.spec, report.ok,
                    {bid: reasons[0] for bid, reasons in report.damaged_backups.items()},
                    {k: done[k] for k in ("backups_checked", "chunks_checked", "packs_checked", "packs_not_read",
                                          "bytes_read", "seconds")} | {"damaged_objects": len(report.damaged_objects)}))
            reports[row.id] = done
        self.last_verify = reports
        return reports

    def _loop(self) -> None:
        # At each multiple of the interval since the epoch (daily: 00:00 UTC), not an interval after the
        # start: a server restarted more often than that still verifies, and takes the right group.
        while not self._stop.wait(self.interval - self.clock() % self.interval):
            try:
                self.verify_all()
            except Exception:
                LOG.exception("scheduled vault verification failed")

    def start(self) -> None:
        if not self.interval:
            return
        self._thread = threading.Thread(target=self._loop, name="raksha-verify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
