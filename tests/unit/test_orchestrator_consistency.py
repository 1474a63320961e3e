"""The service passes a job's wanted consistency (and the older runs whose changed-block tracking the
driver retires) to the agent and records what each VM reached, the run's
being the weakest (the agent is a stand-in here; the real one runs on guests in
tests/functional/test_service_cycle.py and the hooks in test_application_consistency.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.db import Database
from raksha.db import api as db
from raksha.hypervisor.group_backup import GroupResult, VmResult
from raksha.services import vaults
from raksha.services.orchestrator import Orchestrator
from raksha.services.views import run_view
from raksha.vault.engine.progress import ProgressEvent

P, USER = "project-1", "user-1"
REACHED = {"vm-app": ("application", "pre-freeze hook ran (0.1 s). "),
           "vm-fs": ("filesystem", "no pre-freeze hook at /etc/raksha/hooks/pre-freeze. ")}


class StandInAgent:
    def __init__(self) -> None:
        self.wanted: list[str | None] = []
        self.retired: list[list[str]] = []
        self.fail_next = False

    def describe_vm(self, ref: str) -> dict[str, str]:
        return {"uuid": f"uuid-{ref}", "name": ref}

    def backup(self, vault: Any, job: str, run: str, names: list[str], **kwargs: Any) -> GroupResult:
        self.wanted.append(kwargs["consistency"])
        self.retired.append(list(kwargs["retire_runs"]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the agent died mid-run")
        kwargs["progress"](names[0], "vda", ProgressEvent("read", 1, 1, 0.1))  # the run moves to uploading
        return GroupResult(job, run, 250.0, [VmResult(n, f"uuid-{n}", *REACHED[n]) for n in names],
                           pre_freeze_ms=120.0, post_thaw_ms=80.0)


@pytest.mark.parametrize("wanted", [None, "filesystem"])
def test_wanted_level_passed_through_and_the_weakest_recorded(raksha_db: Database, tmp_path: Path,
                                                              wanted: str | None) -> None:
    agent = StandInAgent()
    with raksha_db.begin() as s:
        vaults.ensure_default(s, str(tmp_path / "vault"), encrypt=False, key_file=str(tmp_path / "key"))
        job = db.create_job(s, P, USER, name="app", vms=["vm-app", "vm-fs"], consistency=wanted)
        run_id = db.create_run(s, P, USER, job.id, backuptype="full").id
    Orchestrator(raksha_db, agent, restore_dir=str(tmp_path / "restored")).run_backup(P, run_id)  # type: ignore[arg-type]
    assert agent.wanted == [wanted]
    with raksha_db.begin() as s:
        run = db.get_run(s, P, run_id)
        assert run.consistency == "filesystem" and run.freeze_ms == 250
        assert {vm.vm_name: (vm.consistency, vm.consistency_note) for vm in run.vms} == {
            n: (level, why) for n, (level, why) in REACHED.items()}


def test_runs_name_the_older_runs_whose_tracking_they_retire(raksha_db: Database, tmp_path: Path) -> None:
    """A full run retires the last good run (a new chain starts) and the failed runs since; an incremental
    only the failed runs since its parent (the driver drops the parent's itself)."""
    agent = StandInAgent()
    orchestrator = Orchestrator(raksha_db, agent, restore_dir=str(tmp_path / "restored"))  # type: ignore[arg-type]
    with raksha_db.begin() as s:
        vaults.ensure_default(s, str(tmp_path / "vault"), encrypt=False, key_file=str(tmp_path / "key"))
        job = db.create_job(s, P, USER, name="app", vms=["vm-app"]).id
    runs = []

    def run(kind: str, fail: bool = False) -> None:
        with raksha_db.begin() as s:
            parent = db.latest_run(s, P, job) if kind == "incremental" else None
            runs.append(db.create_run(s, P, USER, job, backuptype=kind,
                                      parent_run_id=parent.id if parent else None).id)
        agent.fail_next = fail
        orchestrator.run_backup(P, runs[-1])

    run("full")                      # 0
    run("incremental")               # 1
    run("incremental", fail=True)    # 2: error
    run("incremental")               # 3: parent 1, retires 2
    run("full", fail=True)           # 4: error
    run("full")                      # 5: retires 4 and 3 (the last good run)
    assert agent.retired == [[], [], [], [runs[2]], [runs[3]], [runs[4], runs[3]]]
    with raksha_db.begin() as s:
        assert db.get_run(s, P, runs[2]).status == "error"


def test_what_a_good_backup_left_for_the_next_run_is_shown_on_its_vm(raksha_db: Database, tmp_path: Path) -> None:
    class Warns(StandInAgent):
        def backup(self, vault: Any, job: str, run: str, names: list[str], **kwargs: Any) -> GroupResult:
            result = super().backup(vault, job, run, names, **kwargs)
            result.vms[0].warnings.append("vm-app:vda: committing the old layers failed, left for the next run")
            return result

    with raksha_db.begin() as s:
        vaults.ensure_default(s, str(tmp_path / "vault"), encrypt=False, key_file=str(tmp_path / "key"))
        job = db.create_job(s, P, USER, name="app", vms=["vm-app", "vm-fs"])
        run_id = db.create_run(s, P, USER, job.id, backuptype="full").id
    Orchestrator(raksha_db, Warns(), restore_dir=str(tmp_path / "restored")).run_backup(P, run_id)  # type: ignore[arg-type]
    with raksha_db.begin() as s:
        view = run_view(db.get_run(s, P, run_id), "/v1/p")
    assert view["status"] == "available"
    assert {vm["name"]: vm["warnings"] for vm in view["vms"]} == {
        "vm-app": ["vm-app:vda: committing the old layers failed, left for the next run"], "vm-fs": []}
