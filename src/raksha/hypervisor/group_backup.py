"""Back up several running domains as one point in time into the vault.

The run is named ``<job>/<run>``; each disk lands at ``<job>/<run>/<vm uuid>/<target>``.
An incremental uses the libvirt checkpoint the parent run left on each domain;
a domain whose checkpoint is gone (undefined, migrated, a crash) is read in
full and the run says why. After a good run only its own checkpoint is kept,
so bitmaps never pile up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import libvirt

from raksha.domain.errors import NotFound
from raksha.hypervisor.disks import backing_chain, domain_interfaces
from raksha.hypervisor.pull import consistency_group, tracked
from raksha.vault.engine.backup import backup_disk
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault


@dataclass
class DiskResult:
    target: str
    backup_id: str
    kind: str  # full | incremental
    tracking: str  # how its changes were found
    bytes_read: int
    bytes_stored: int


@dataclass
class VmResult:
    name: str
    uuid: str
    consistency: str
    why: str = ""
    disks: list[DiskResult] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # disk targets left out on purpose (temp space)


@dataclass
class GroupResult:
    job: str
    run: str
    freeze_ms: float
    vms: list[VmResult]


def checkpoint_name(job: str, run: str) -> str:
    return f"raksha-{job}-{run}"


def _has_checkpoint(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def backup_domains(conn: libvirt.virConnect, names: list[str], vault: Vault, job: str, run: str,
                   *, parent_run: str | None = None, threads: int | None = None,
                   exclude: dict[str, set[str]] | None = None) -> GroupResult:
    doms = []
    for name in names:
        try:
            doms.append(conn.lookupByName(name))
        except libvirt.libvirtError:
            raise NotFound(f"no domain {name!r} on {conn.getURI()}", code="VM_NOT_FOUND") from None
    parent_cp = checkpoint_name(job, parent_run) if parent_run else None
    plan = [(dom, parent_cp if parent_cp and _has_checkpoint(dom, parent_cp) else None) for dom in doms]
    results = []
    with consistency_group(plan, checkpoint_name(job, run), exclude=exclude) as point:
        for p in point.domains:
            vm = VmResult(p.domain.name(), p.domain.UUIDString(), p.consistency, p.why)
            # Enough to recreate the VM: its definition and its network mappings (seed: "network mappings").
            xml = p.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)
            described = {"domain_xml": xml, "interfaces": json.dumps(domain_interfaces(xml))}
            for disk in p.disks:
                bid = BackupId(job, run, vm.uuid, disk.target)
                parent = BackupId(job, parent_run, vm.uuid, disk.target) if parent_run else None
                use_bitmap = (p.parent_checkpoint is not None and tracked(disk) and parent is not None
                              and vault.has_backup(parent))
                if use_bitmap:
                    tracking = f"checkpoint {p.parent_checkpoint} dirty bitmap"
                elif not tracked(disk):
                    tracking = f"full read: a {disk.format} disk keeps no dirty bitmap (checkpoints need qcow2)"
                elif parent_run:
                    tracking = f"full read: checkpoint {parent_cp} or parent backup {parent} missing"
                else:
                    tracking = "full read"
                source = p.source(disk)
                try:
                    result = backup_disk(
                        vault, source, bid,
                        parent=parent if use_bitmap else None,
                        changed_extents=source.dirty_extents() if use_bitmap else None,
                        threads=threads,
                        hints={"vm_name": vm.name, "consistency": p.consistency, "consistency_note": p.why,
                               "freeze_ms": f"{point.freeze_ms:.0f}", "tracking": tracking,
                               "disk_path": disk.path, "disk_format": disk.format, "bus": disk.bus,
                               "backing_chain": json.dumps(backing_chain(disk.path)), **described},
                    )
                finally:
                    source.close()
                vm.disks.append(DiskResult(disk.target, str(bid), result.kind, tracking,
                                           result.stats.bytes_read, result.stats.bytes_stored))
            vm.excluded = [d.target for d in p.excluded]
            results.append(vm)
        freeze_ms = point.freeze_ms
    # The new checkpoint is the base of the next incremental; the older one is no longer needed.
    for dom, old_checkpoint in plan:
        if old_checkpoint is not None:
            try:
                dom.checkpointLookupByName(old_checkpoint).delete(0)
            except libvirt.libvirtError:
                pass
    return GroupResult(job, run, freeze_ms, results)
