"""Restore a backed-up VM as a new libvirt domain: new name and UUID, fresh disks, new MACs by default."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from raksha.domain.errors import AlreadyExists, InvalidInput, NotFound, SourceError
from raksha.hypervisor.disks import domain_disks
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault


@dataclass
class RestoredDomain:
    name: str
    uuid: str
    disks: dict[str, str] = field(default_factory=dict)  # target -> restored image
    chunks_verified: int = 0
    started: bool = False


def new_domain_xml(domain_xml: str, name: str, disks: dict[str, tuple[str, str]], *, keep_macs: bool) -> str:
    """The saved definition as a new VM: renamed, no UUID (libvirt makes one), ``disks`` (target -> (path,
    format)) pointed at the restored images, every other disk dropped (never share the original's), file
    consoles turned into ptys, MACs removed so libvirt generates new ones unless ``keep_macs``."""
    root = ET.fromstring(domain_xml)
    name_el = root.find("name")
    if name_el is None:
        raise InvalidInput("the saved domain XML has no name", code="DOMAIN_XML_INVALID")
    name_el.text = name
    for tag in ("uuid",):
        el = root.find(tag)
        if el is not None:
            root.remove(el)
    devices = root.find("devices")
    if devices is None:
        raise InvalidInput("the saved domain XML has no devices", code="DOMAIN_XML_INVALID")
    for disk in list(devices.findall("disk")):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if disk.get("device", "disk") != "disk":
            continue
        if dev not in disks:
            devices.remove(disk)
            continue
        path, fmt = disks[dev]
        disk.set("type", "file")
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        ET.SubElement(disk, "source", {"file": path})
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", fmt)
    for tag in ("serial", "console"):  # a console logging to a file belongs to the original VM
        for port in devices.findall(tag):
            if port.get("type") == "file":
                port.set("type", "pty")
                for src in port.findall("source"):
                    port.remove(src)
    if not keep_macs:
        for iface in devices.findall("interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    return ET.tostring(root, encoding="unicode")


def restore_domain(conn: libvirt.virConnect, vault: Vault, job: str, run: str, vm: str, *, name: str,
                   target_dir: Path, fmt: str = "qcow2", only_disks: set[str] | None = None,
                   keep_macs: bool = False, start: bool = True) -> RestoredDomain:
    """Restore VM ``vm`` (its UUID in the backup ids) of run ``job/run`` as the new domain ``name``."""
    try:
        conn.lookupByName(name)
        raise AlreadyExists(f"a domain named {name!r} exists", code="DOMAIN_EXISTS")
    except libvirt.libvirtError:
        pass
    ids = [b for b in vault.backup_ids(f"{job}/{run}/{vm}/") if only_disks is None or b.resource in only_disks]
    if not ids:
        raise NotFound(f"no backups of VM {vm} in run {job}/{run}", code="BACKUP_NOT_FOUND")
    hints = vault.read_metadata(ids[0]).get("hints", {})
    if "domain_xml" not in hints:
        raise InvalidInput(f"run {job}/{run} saved no domain definition for {vm}", code="DOMAIN_XML_MISSING")
    result = RestoredDomain(name, "")
    restored: dict[str, tuple[str, str]] = {}
    for bid in ids:
        out = target_dir / f"{name}-{bid.resource}.{fmt}"
        res = restore_backup(vault, BackupId.parse(str(bid)), str(out), fmt=fmt)
        restored[bid.resource] = (str(out), fmt)
        result.disks[bid.resource] = str(out)
        result.chunks_verified += res.chunks_verified
    dom = conn.defineXML(new_domain_xml(hints["domain_xml"], name, restored, keep_macs=keep_macs))
    result.uuid = dom.UUIDString()
    if start:
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            dom.undefine()  # roll back: no half-made VM left behind; the restored images stay for a retry
            raise SourceError(f"restored domain {name} did not start: {exc.get_error_message()}") from None
        result.started = True
    return result


def restore_in_place(conn: libvirt.virConnect, vault: Vault, job: str, run: str, vm: str,
                     *, only_disks: set[str] | None = None, start: bool = True) -> RestoredDomain:
    """Put a domain's disks back to run ``job/run``: the domain is shut off, each disk image is replaced by a
    verified restore (written beside it, renamed over it only when complete), and it is started again."""
    try:
        dom = conn.lookupByUUIDString(vm)
    except libvirt.libvirtError:
        raise NotFound(f"no domain with UUID {vm} to restore in place", code="VM_NOT_FOUND") from None
    current = {d.target: d for d in domain_disks(dom.XMLDesc(0))}
    ids = [b for b in vault.backup_ids(f"{job}/{run}/{vm}/") if only_disks is None or b.resource in only_disks]
    if not ids:
        raise NotFound(f"no backups of VM {vm} in run {job}/{run}", code="BACKUP_NOT_FOUND")
    missing = [b.resource for b in ids if b.resource not in current]
    if missing:
        raise InvalidInput(f"domain {dom.name()} has no disk {', '.join(missing)} any more", code="DISK_MISMATCH")
    if not dom.isPersistent():
        raise InvalidInput(f"domain {dom.name()} is transient: it would vanish when shut off; restore it as a "
                           "new domain instead", code="DOMAIN_TRANSIENT")
    if dom.isActive():
        dom.destroy()  # a clean shutdown needs a cooperating guest; the disks are overwritten anyway
    # The replaced images carry none of the old bitmaps: forget the checkpoints, so the next backup
    # reads in full (and says why) instead of failing on a bitmap that no longer exists.
    for cp in dom.listAllCheckpoints():
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    result = RestoredDomain(dom.name(), dom.UUIDString())
    for bid in ids:
        disk = current[bid.resource]
        fmt = "qcow2" if disk.format == "qcow2" else "raw"
        res = restore_backup(vault, BackupId.parse(str(bid)), disk.path, fmt=fmt, overwrite=True)
        result.disks[bid.resource] = disk.path
        result.chunks_verified += res.chunks_verified
    if start:
        dom.create()
        result.started = True
    return result
