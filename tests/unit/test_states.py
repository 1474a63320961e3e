"""The run, VM, disk-backup and restore life cycles (raksha.domain.states), as examples."""

from __future__ import annotations

import pytest

from raksha.domain import states
from raksha.domain.errors import Conflict, InvalidStateTransition
from raksha.domain.states import (
    RESTORE,
    RUN,
    RUN_VM,
    RUN_VM_RESOURCE,
    VM_RESOURCE_BACKUP,
    RunStatus,
    VmStatus,
    run_outcome,
    run_progress_status,
)


def test_a_run_goes_from_queued_through_snapshotting_and_uploading_to_available() -> None:
    status = RUN.initial
    for new in ("snapshotting", "uploading", "available"):
        status = RUN.check(status, new)
    assert status == "available"
    assert RUN.is_terminal(status)


def test_a_run_cannot_skip_the_snapshot() -> None:
    with pytest.raises(InvalidStateTransition) as caught:
        RUN.check("queued", "uploading", resource_id="run-1")
    err = caught.value
    assert err.code == "INVALID_STATE_TRANSITION"
    assert isinstance(err, Conflict)  # the API answers 409
    assert err.details == {"resource": "backupjobrun", "id": "run-1", "status": "queued", "requested": "uploading"}
    assert "queued cannot become uploading" in err.message


def test_a_finished_run_moves_only_towards_deletion() -> None:
    for done in ("available", "partial", "error", "cancelled"):
        assert RUN.transitions[done] == {"deleting"}
    assert RUN.check("deleting", "deleted") == "deleted"
    assert RUN.final == {"deleted"}
    with pytest.raises(InvalidStateTransition):
        RUN.check("deleted", "deleting")


def test_a_queued_run_is_cancelled_at_once_a_working_one_through_cancelling() -> None:
    assert RUN.can("queued", "cancelled")
    assert not RUN.can("uploading", "cancelled")
    assert RUN.check("uploading", "cancelling") == "cancelling"
    # a cancel that arrives after the last byte was stored ends as the work did
    assert RUN.can("cancelling", "available") and RUN.can("cancelling", "cancelled")


def test_unknown_statuses_are_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(InvalidStateTransition, match="statuses: available"):
        RUN.check("queued", "running")
    with pytest.raises(InvalidStateTransition, match="unknown status"):
        RUN.check("running", "queued")


def test_active_runs_are_those_with_work_in_progress() -> None:
    assert RUN.active == {"queued", "snapshotting", "uploading", "cancelling", "deleting"}
    assert RUN.states == RUN.active | RUN.terminal


def test_vms_and_disks_share_a_life_cycle_that_can_fail_or_be_cancelled_at_any_stage() -> None:
    for machine in (RUN_VM, RUN_VM_RESOURCE):
        for stage in ("queued", "snapshotting", "uploading"):
            assert machine.can(stage, "error") and machine.can(stage, "cancelled")
        assert machine.final == {"available", "error", "cancelled"}


def test_a_disk_backup_is_created_then_available_and_deleted_in_two_steps() -> None:
    status = VM_RESOURCE_BACKUP.initial
    assert status == "creating"
    for new in ("available", "deleting", "deleted"):
        status = VM_RESOURCE_BACKUP.check(status, new)
    with pytest.raises(InvalidStateTransition):
        VM_RESOURCE_BACKUP.check("creating", "deleted")


def test_a_restore_runs_once() -> None:
    assert RESTORE.check(RESTORE.check("queued", "restoring"), "available") == "available"
    assert RESTORE.final == {"available", "error", "cancelled"}
    assert not RESTORE.can("error", "restoring")


def test_every_machine_reaches_a_terminal_state_from_every_state() -> None:
    for machine in (states.RUN, RUN_VM, VM_RESOURCE_BACKUP, RESTORE, states.JOB):
        for start in machine.states:
            seen, todo = {start}, [start]
            while todo:
                for nxt in machine.transitions[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            assert seen & machine.terminal, (machine.name, start)
            assert machine.initial in machine.states


def test_a_run_whose_vms_all_made_it_is_available() -> None:
    assert run_outcome(["available", "available"]) is RunStatus.AVAILABLE


def test_a_run_where_one_vm_failed_is_partial_and_still_restorable() -> None:
    outcome = run_outcome(["available", "error"])
    assert outcome is RunStatus.PARTIAL
    assert outcome in states.RESTORABLE_RUN_STATUSES


def test_a_run_where_every_vm_failed_is_an_error_and_not_restorable() -> None:
    assert run_outcome(["error", "error"]) is RunStatus.ERROR
    assert run_outcome([]) is RunStatus.ERROR
    assert RunStatus.ERROR not in states.RESTORABLE_RUN_STATUSES


def test_a_cancel_that_stopped_any_vm_makes_the_run_cancelled() -> None:
    assert run_outcome(["available", "cancelled"]) is RunStatus.CANCELLED
    assert run_outcome(["error", "cancelled"]) is RunStatus.CANCELLED


def test_a_run_has_no_outcome_while_a_vm_is_still_working() -> None:
    with pytest.raises(InvalidStateTransition) as caught:
        run_outcome(["available", "uploading"])
    assert caught.value.code == "RUN_NOT_SETTLED"


def test_while_working_a_run_shows_the_least_advanced_unfinished_vm() -> None:
    assert run_progress_status(["snapshotting", "queued"]) is RunStatus.QUEUED
    assert run_progress_status(["uploading", "snapshotting"]) is RunStatus.SNAPSHOTTING
    assert run_progress_status(["available", "uploading"]) is RunStatus.UPLOADING
    assert run_progress_status(["available", "error"]) is RunStatus.PARTIAL


def test_statuses_are_plain_strings_for_the_database_and_json() -> None:
    assert VmStatus.UPLOADING == "uploading"
    assert f"{RunStatus.PARTIAL}" == "partial"
