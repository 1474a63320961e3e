"""Two running guests backed up as one point in time with ``raksha.hypervisor.pull``.

One guest has an agent (frozen: ``filesystem`` level), the other has none
(``crash`` level, and it says why). Full, then a dirty-bitmap incremental of
both; each restored disk holds exactly what its guest had at that point.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor import pull  # noqa: E402
from raksha.hypervisor.disks import domain_disks  # noqa: E402
from raksha.hypervisor.pull import CRASH, FILESYSTEM, consistency_group  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.backup import backup_disk  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


def test_two_guests_one_point_in_time_full_then_incremental(conn: libvirt.virConnect, tmp_path: Path) -> None:
    guest = build_guest()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    disk_a = make_data_disk(tmp_path / "a.qcow2", "64M")
    disk_b = make_data_disk(tmp_path / "b.qcow2", "64M", seed_dir=None)
    data = {run: os.urandom(32 << 10) for run in ("run1", "run2")}

    with GuestDomain(conn, guest, [(disk_a, "qcow2")], tmp_path, name="raksha-cg-a") as a, \
            GuestDomain(conn, guest, [(disk_b, "qcow2")], tmp_path, name="raksha-cg-b", agent=False) as b:
        a.wait_for_agent()
        assert a.dom is not None and b.dom is not None
        assert [d.target for d in domain_disks(a.dom.XMLDesc(0))] == ["vda"]
        parents: dict[str, str | None] = {"raksha-cg-a": None, "raksha-cg-b": None}
        for run, checkpoint in (("run1", "c1"), ("run2", "c2")):
            assert a.exec(f"cat > /mnt/vda/{run}.bin && sync", stdin=data[run])[0] == 0
            doms = [(a.dom, parents["raksha-cg-a"]), (b.dom, parents["raksha-cg-b"])]
            with consistency_group(doms, checkpoint) as point:
                levels = {p.domain.name(): p.consistency for p in point.domains}
                assert levels == {"raksha-cg-a": FILESYSTEM, "raksha-cg-b": CRASH}
                assert "no freeze" in next(p for p in point.domains if p.domain.name() == "raksha-cg-b").why
                assert point.freeze_ms < 5000
                for p in point.domains:  # made before the window and handed to libvirt, private to root
                    assert p.scratch_made
                    (scratch,) = re.findall(r"<scratch file=.([^'\"]+)", p.domain.backupGetXMLDesc(0))
                    assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o600
                for p in point.domains:
                    (disk,) = p.disks
                    source = p.source(disk)
                    try:
                        parent_id = f"job/run1/{p.domain.name()}/vda" if p.parent_checkpoint else None
                        changed = source.dirty_extents() if p.parent_checkpoint else None
                        backup_disk(vault, source, BackupId.parse(f"job/{run}/{p.domain.name()}/vda"),
                                    parent=BackupId.parse(parent_id) if parent_id else None,
                                    changed_extents=changed,
                                    hints={"consistency": p.consistency, "freeze_ms": f"{point.freeze_ms:.0f}"})
                    finally:
                        source.close()
            parents = {"raksha-cg-a": checkpoint, "raksha-cg-b": checkpoint}
        # Every pull job was ended: the domains accept a new one.
        assert a.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

    for run in ("run1", "run2"):
        out = tmp_path / f"{run}-a.raw"
        restore_backup(vault, BackupId.parse(f"job/{run}/raksha-cg-a/vda"), str(out))
        assert debugfs_cat(out, f"/{run}.bin") == data[run]
        restore_backup(vault, BackupId.parse(f"job/{run}/raksha-cg-b/vda"), str(tmp_path / f"{run}-b.raw"))
    assert debugfs_cat(tmp_path / "run1-a.raw", "/run2.bin") == b""
    meta = vault.read_metadata(BackupId.parse("job/run2/raksha-cg-b/vda"))
    assert meta["hints"]["consistency"] == CRASH and meta["kind"] == "incremental"


def test_scratch_images_libvirt_refuses_are_made_by_libvirt_instead(conn: libvirt.virConnect, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Raksha's own scratch images only save time inside the window: one libvirt will not take (here: of the
    wrong size) costs a second try, never the run."""
    real = pull._start_scratch

    def wrong_size(p: pull.DomainPoint, scratch_dir: str) -> list:
        for d in p.disks:
            p.plan(d).size = 1 << 20
        return real(p, scratch_dir)

    monkeypatch.setattr(pull, "_start_scratch", wrong_size)
    disk = make_data_disk(tmp_path / "a.qcow2", "64M")
    with GuestDomain(conn, build_guest(), [(disk, "qcow2")], tmp_path, name="raksha-cg-scratch", agent=False) as a:
        assert a.dom is not None
        with consistency_group([(a.dom, None)], "c1") as point:
            (p,) = point.domains
            assert p.started and not p.scratch_made and p.error is None
            (vda,) = p.disks
            source = p.source(vda)
            try:
                assert source.virtual_size == 64 << 20
            finally:
                source.close()



def test_a_guest_left_frozen_by_a_dead_run_is_thawed_and_frozen_again(conn: libvirt.virConnect,
                                                                        tmp_path: Path) -> None:
    """A run killed inside its window leaves its guest frozen. No status is asked up front: the guest's agent
    refuses the freeze (or the hook) as disabled in frozen state, and only then is the guest found frozen,
    thawed and frozen again; the run reaches ``filesystem`` and says what it found."""
    disk = make_data_disk(tmp_path / "a.qcow2", "64M")
    with GuestDomain(conn, build_guest(), [(disk, "qcow2")], tmp_path, name="raksha-cg-left") as a:
        a.wait_for_agent()
        assert a.agent("guest-fsfreeze-freeze") >= 1  # what the dead run left
        with consistency_group([(a.dom, None)], "c1", hooks=None) as point:
            (p,) = point.domains
            assert p.consistency == FILESYSTEM and "found frozen by an interrupted run" in p.why, p.why
        assert a.agent("guest-fsfreeze-status") == "thawed"
        with consistency_group([(a.dom, "c1")], "c2", hooks=None) as point:
            (p,) = point.domains
            assert p.consistency == FILESYSTEM and "interrupted" not in p.why, p.why
