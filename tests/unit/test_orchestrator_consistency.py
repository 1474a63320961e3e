"""The service passes a job's wanted consistency to the agent and records what each VM reached, the run's
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
from raksha.vault.engine.progress import ProgressEvent

P, USER = "project-1", "user-1"
REACHED = {"vm-app": ("application", "pre-freeze hook ran (0.1 s). "),
           "vm-fs": ("filesystem", "no pre-freeze hook at /etc/raksha/hooks/pre-freeze. ")}


class StandInAgent:
    def __init__(self) -> None:
        self.wanted: list[str | None] = []

    def describe_vm(self, ref: str) -> dict[str, str]:
        return {"uuid": f"uuid-{ref}", "name": ref}

    def backup(self, vault: Any, job: str, run: str, names: list[str], **kwargs: Any) -> GroupResult:
        self.wanted.append(kwargs["consistency"])
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


def test_a_job_that_wants_crash_records_no_freeze_window(raksha_db: Database, tmp_path: Path) -> None:
    """The driver times the span around starting its backup jobs even when it froze nothing: not a freeze."""
    agent = StandInAgent()
    with raksha_db.begin() as s:
        vaults.ensure_default(s, str(tmp_path / "vault"), encrypt=False, key_file=str(tmp_path / "key"))
        job = db.create_job(s, P, USER, name="app", vms=["vm-app"], consistency="crash")
        run_id = db.create_run(s, P, USER, job.id, backuptype="full").id
    Orchestrator(raksha_db, agent, restore_dir=str(tmp_path / "restored")).run_backup(P, run_id)  # type: ignore[arg-type]
    assert agent.wanted == ["crash"]
    with raksha_db.begin() as s:
        assert db.get_run(s, P, run_id).freeze_ms == 0
