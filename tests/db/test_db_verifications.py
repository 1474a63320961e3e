"""What a scheduled verification pass does to the runs stored in a vault service: a run it names is
``damaged`` at once; once the recent passes have read every pack, every run finished before they began
and named by none of them is ``ok``. On SQLite, and in the slow runs on real PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from test_db_runs import back_up, make_job

from raksha.db import Database
from raksha.db import api as db
from raksha.db.models import BackupJobRun, VaultService, VmResourceBackup
from raksha.db.types import utcnow
from raksha.domain.verify_coverage import VerifyPass


def _stored_in(raksha_db: Database, vault_id: str) -> None:
    with raksha_db.begin() as s:
        s.execute(update(VmResourceBackup).values(vault_service_id=vault_id))


def _vault(raksha_db: Database) -> str:
    with raksha_db.begin() as s:
        return db.create_vault_service(s, None, None, name="default", type="local", url="file:///v").id


def _pass(subset: str, damaged: dict[str, str] | None = None, *, after: float = 1.0) -> VerifyPass:
    start = utcnow() + timedelta(seconds=after)
    return VerifyPass(start, start + timedelta(seconds=1), subset, not damaged, damaged or {}, {})


def _states(raksha_db: Database) -> dict[str, tuple[Any, ...]]:
    with raksha_db.begin() as s:
        return {r.id: (r.verify_state, r.verify_note) for r in s.execute(select(BackupJobRun)).scalars()}


def test_runs_are_verified_once_every_group_was_read_after_they_finished(raksha_db: Database) -> None:
    vault = _vault(raksha_db)
    job = make_job(raksha_db, vms=("vm-a",))
    run = back_up(raksha_db, job)
    _stored_in(raksha_db, vault)
    with raksha_db.begin() as s:
        assert db.record_verification(s, vault, _pass("1/2")) is None
    assert _states(raksha_db) == {run.id: (None, None)}
    with raksha_db.begin() as s:
        cov = db.record_verification(s, vault, _pass("2/2", after=2.0))
    assert cov is not None
    assert _states(raksha_db) == {run.id: ("ok", None)}
    with raksha_db.begin() as s:
        kept = s.get(VaultService, vault).verifications
        assert [p["data_subset"] for p in kept] == ["2/2", "1/2"]
        assert s.get(BackupJobRun, run.id).verified_at is not None


def test_a_run_finished_after_the_passes_began_waits_for_the_next_cycle(raksha_db: Database) -> None:
    vault = _vault(raksha_db)
    job = make_job(raksha_db, vms=("vm-a",))
    first = _pass("1/2", after=-60)  # began before the run finished
    run = back_up(raksha_db, job)
    _stored_in(raksha_db, vault)
    with raksha_db.begin() as s:
        db.record_verification(s, vault, first)
        assert db.record_verification(s, vault, _pass("2/2")) is not None
    assert _states(raksha_db) == {run.id: (None, None)}
    with raksha_db.begin() as s:
        db.record_verification(s, vault, _pass("1/2", after=2.0))
    assert _states(raksha_db) == {run.id: ("ok", None)}


def test_a_run_named_damaged_is_damaged_at_once_and_stays_so_while_the_window_names_it(raksha_db: Database) -> None:
    vault = _vault(raksha_db)
    job = make_job(raksha_db, vms=("vm-a", "vm-b"))
    good = back_up(raksha_db, job)
    bad = back_up(raksha_db, job, backuptype="incremental", parent=good)
    _stored_in(raksha_db, vault)
    bid = f"{job}/{bad.id}/vm-b/vda"
    with raksha_db.begin() as s:
        db.record_verification(s, vault, _pass("1/2", {bid: "chunk 3f2a... missing (pack 9c1d... gone)"}))
    states = _states(raksha_db)
    assert states[bad.id] == ("damaged", "vm-b/vda: chunk 3f2a... missing (pack 9c1d... gone)")
    assert states[good.id] == (None, None)
    with raksha_db.begin() as s:
        db.record_verification(s, vault, _pass("2/2", after=2.0))
    states = _states(raksha_db)
    assert states[good.id] == ("ok", None) and states[bad.id][0] == "damaged"


def test_runs_of_another_vault_are_left_alone(raksha_db: Database) -> None:
    vault, other = _vault(raksha_db), _vault(raksha_db)
    run = back_up(raksha_db, make_job(raksha_db, vms=("vm-a",)))
    _stored_in(raksha_db, other)
    with raksha_db.begin() as s:
        assert db.record_verification(s, vault, _pass("1/1")) is not None
    assert _states(raksha_db) == {run.id: (None, None)}
    with raksha_db.begin() as s:
        db.record_verification(s, other, _pass("1/1", after=2.0))
    assert _states(raksha_db) == {run.id: ("ok", None)}
