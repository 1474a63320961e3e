"""Restore a backup point through one driver API: as new domains, as image files, or in place.

A :class:`RestoreRequest` names a run (``job/run``), optionally which VMs (names as backed up, or
UUIDs) and which disks (targets), and a type:

``new_vm``
    Each VM comes back as a new domain: a new name and UUID, fresh sparse disks (raw or qcow2) in
    ``target_dir`` named ``<new name>-<target>.<fmt>``, MACs regenerated unless ``keep_macs``,
    started unless ``start=False``. Only the selected disks are attached; the original's other
    disks are never shared.
``files``
    The selected disks are written as images ``<vm name>-<target>.<fmt>`` in ``target_dir``, with
    the saved definition ``<vm name>.xml`` and network mappings ``<vm name>-interfaces.json``
    beside them, enough to recreate the VM by hand.
``in_place``
    The domain (same UUID) is shut off, the selected disks are put back and it is started again
    (unless ``start=False``). A qcow2 disk with a usable checkpoint bitmap gets only the chunks that
    differ written, in place (rollback.py, ADR 0022); otherwise each disk is replaced by a verified
    restore written beside it.

Everything that can be checked is checked before anything is written or shut off: the run, the
VM and disk selection, the target directory, name and path collisions, the domains. Each disk is
restored by :func:`restore_backup`, which hashes every chunk it writes against the chunk's id;
a disk is reported only once every distinct chunk of its manifest was verified that way.
Progress is reported in bytes across all disks of the request. libvirt errors are translated
here, at the boundary, into :mod:`raksha.domain.errors` with stable codes.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from raksha.domain.errors import AlreadyExists, HypervisorError, InvalidInput, NotFound, RakshaError, VaultCorrupt
from raksha.hypervisor.disks import DiskInfo, backing_chain, domain_disks
from raksha.hypervisor.errors import translate
from raksha.hypervisor.qemu_access import blocking_dir, describe, qemu_user
from raksha.hypervisor.rollback import RawBitmaps, Rollback, plan_raw_rollback, plan_rollback, read_raw_bitmaps
from raksha.hypervisor.snapshot import Layer, disk_chains, is_overlay
from raksha.vault.engine.progress import Progress, ProgressCallback, ProgressEvent
from raksha.vault.engine.restore import blobs_to_verify, restore_backup, restore_chunks
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.operations.compare import compare_image
from raksha.vault.repository import Vault
from raksha.vault.sources.open import open_source

NEW_VM, FILES, IN_PLACE = "new_vm", "files", "in_place"
RESTORE_TYPES = (NEW_VM, FILES, IN_PLACE)
FORMATS = ("raw", "qcow2")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore and how; see the module docstring for the three types."""

    job: str
    run: str
    type: str = NEW_VM
    vms: Collection[str] | None = None  # names as backed up, or UUIDs; None: every VM of the run
    disks: Collection[str] | None = None  # targets (vda, ...) each selected VM must have; None: all
    target_dir: str | os.PathLike[str] | None = None  # new_vm and files
    fmt: str = "qcow2"  # new_vm and files: raw | qcow2 (in_place keeps each disk's own format)
    names: Mapping[str, str] = field(default_factory=dict)  # new_vm: source name or UUID -> new name
    keep_macs: bool = False  # new_vm
    start: bool = True  # new_vm and in_place
    # in_place: write only the chunks that differ where the disks' dirty bitmaps allow it (rollback.py);
    # False rewrites every disk whole
    changed_only: bool = True
    # every restored disk read back and compared with its backup, chunk by chunk (costs a read of its data)
    read_back: bool = False
    threads: int | None = None


@dataclass
class RestoredDisk:
    target: str
    backup_id: str
    path: str
    format: str
    virtual_size: int
    bytes_written: int
    chunks: int  # distinct data chunks the manifest lists (all-zero chunks are written as holes)
    chunks_verified: int  # chunks whose data was hashed against their id while restoring
    content_digest: str  # the manifest's digest of the point
    # in_place: how the disk was written: "whole" (a fresh image renamed over it), or "changed" (only the
    # chunks that differ, in place; ``how`` says which and why the rest already held the point)
    method: str = "whole"
    how: str = ""
    read_back: bool | None = None  # True: read back after the restore and identical; None: not read back

    @property
    def verified(self) -> bool:
        return self.chunks_verified == self.chunks

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "backup_id": self.backup_id, "path": self.path, "format": self.format,
                "virtual_size": self.virtual_size, "bytes_written": self.bytes_written, "chunks": self.chunks,
                "chunks_verified": self.chunks_verified, "verified": self.verified,
                "content_digest": self.content_digest, "method": self.method, "how": self.how,
                "read_back": self.read_back}


@dataclass
class RestoredVm:
    source_name: str  # the VM as backed up
    source_uuid: str
    domain: str | None = None  # the domain holding the disks now (new_vm, in_place); None for files
    uuid: str | None = None
    started: bool = False
    disks: list[RestoredDisk] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # files: the saved definition and network mappings

    def to_dict(self) -> dict[str, Any]:
        return {"source_name": self.source_name, "source_uuid": self.source_uuid, "domain": self.domain,
                "uuid": self.uuid, "started": self.started, "disks": [d.to_dict() for d in self.disks],
                "files": self.files}


@dataclass
class RestoreReport:
    job: str
    run: str
    type: str
    vms: list[RestoredVm] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def domains(self) -> list[str]:
        return [vm.domain for vm in self.vms if vm.domain is not None]

    @property
    def paths(self) -> list[str]:
        """Every file the restore produced or replaced: disk images first, then definitions."""
        return [d.path for vm in self.vms for d in vm.disks] + [f for vm in self.vms for f in vm.files]

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for vm in self.vms for d in vm.disks)

    @property
    def chunks_verified(self) -> int:
        return sum(d.chunks_verified for vm in self.vms for d in vm.disks)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "run": self.run, "type": self.type, "vms": [vm.to_dict() for vm in self.vms],
                "domains": self.domains, "paths": self.paths, "bytes_written": self.bytes_written,
                "chunks_verified": self.chunks_verified, "seconds": round(self.seconds, 3)}


@dataclass
class RestoredDomain:
    """What :func:`restore_domain` and :func:`restore_in_place` return (one VM)."""

    name: str
    uuid: str
    disks: dict[str, str] = field(default_factory=dict)  # target -> restored image
    chunks_verified: int = 0
    started: bool = False


# -- libvirt at the boundary ------------------------------------------------------------------------

_NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN}
_EXISTS = {libvirt.VIR_ERR_DOM_EXIST}
_BAD_XML = {libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_INVALID_ARG}


def translate_libvirt_error(exc: libvirt.libvirtError, what: str) -> RakshaError:
    """A libvirt error met while restoring, as a Raksha error with a stable code; ``what`` says what was
    being done. Restore's own cases first (a domain missing is ``VM_NOT_FOUND`` here, not ``VM_GONE``),
    the rest as everywhere in the driver (:func:`raksha.hypervisor.errors.translate`)."""
    code = exc.get_error_code()
    message = f"{what}: {exc.get_error_message() or exc}"
    if code in _NOT_FOUND:
        return NotFound(message, code="VM_NOT_FOUND", libvirt_code=code)
    if code in _EXISTS or "already exists" in message:
        return AlreadyExists(message, code="DOMAIN_EXISTS", libvirt_code=code)
    if code in _BAD_XML:
        return InvalidInput(message, code="DOMAIN_XML_INVALID", libvirt_code=code)
    err = translate(exc, what)
    err.details.setdefault("libvirt_code", code)
    return err


@contextmanager
def _libvirt(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_libvirt_error(exc, what) from None


def _domain_named(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _NOT_FOUND:
            return None
        raise translate_libvirt_error(exc, f"looking up domain {name!r}") from None


# -- the new domain's definition ---------------------------------------------------------------------


def new_domain_xml(domain_xml: str, name: str, disks: dict[str, tuple[str, str]], *, keep_macs: bool) -> str:
    """The saved definition as a new VM: renamed, no UUID (libvirt makes one), ``disks`` (target -> (path,
    format)) pointed at the restored images, every other disk dropped (never share the original's), file
    consoles turned into ptys, MACs removed so libvirt generates new ones unless ``keep_macs``."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise InvalidInput(f"the saved domain XML does not parse: {exc}", code="DOMAIN_XML_INVALID") from None
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


def _with_backing(chain: list[Layer]) -> list[Layer]:
    """A disk's chain; a shut-off domain's XML may name only its top image, so then read the images'
    own backing references."""
    if len(chain) != 1 or not is_overlay(chain[0].path):
        return chain
    images = backing_chain(chain[0].path)
    return [Layer(i["filename"], i["format"], "block" if _is_block(i["filename"]) else "file")
            for i in images] or chain


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _point_at_bases(domain_xml: str, bases: Mapping[str, _DiskPlan]) -> str:
    """``domain_xml`` with each disk of ``bases`` (target -> plan) on its base image alone, no backing chain."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        plan = bases.get(target.get("dev", "") if target is not None else "")
        if plan is None:
            continue
        disk.set("type", plan.source_type)
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        disk.insert(0, ET.Element("source", {"dev" if plan.source_type == "block" else "file": plan.output}))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", plan.fmt)
    return ET.tostring(root, encoding="unicode")


# -- planning: everything checked before anything is written ----------------------------------------


@dataclass
class _DiskPlan:
    id: BackupId
    manifest: Manifest
    output: str
    fmt: str
    # in_place on a disk whose top is the snapshot strategy's overlay: the base is restored, the domain
    # pointed at it, and these overlay files removed (else it would run on a standalone image named
    # like an overlay and leave its base unused)
    overlays: list[str] = field(default_factory=list)
    source_type: str = "file"

    @property
    def data_bytes(self) -> int:  # what restore_backup writes (and counts as progress)
        return self.manifest.data_bytes()

    @property
    def chunks(self) -> int:
        return blobs_to_verify(self.manifest)


@dataclass
class _VmPlan:
    uuid: str
    name: str
    hints: dict[str, str]
    disks: list[_DiskPlan] = field(default_factory=list)
    new_name: str = ""
    domain: libvirt.virDomain | None = None
    files: dict[str, str] = field(default_factory=dict)  # path -> content (files)


def _run_vms(vault: Vault, job: str, run: str) -> dict[str, list[BackupId]]:
    for part, what in ((job, "job"), (run, "run")):
        if not part or "/" in part:
            raise InvalidInput(f"invalid {what} {part!r}", code="INVALID_BACKUP_ID")
    by_vm: dict[str, list[BackupId]] = {}
    for bid in vault.backup_ids(f"{job}/{run}/"):
        by_vm.setdefault(bid.vm, []).append(bid)
    if not by_vm:
        raise NotFound(f"no backups in run {job}/{run}", code="BACKUP_NOT_FOUND", job=job, run=run)
    return by_vm


def _hints(vault: Vault, bid: BackupId) -> dict[str, str]:
    hints = vault.read_metadata(bid).get("hints", {})
    return {str(k): str(v) for k, v in hints.items()} if isinstance(hints, dict) else {}


def _select_vms(vault: Vault, req: RestoreRequest, by_vm: dict[str, list[BackupId]]) -> list[_VmPlan]:
    vms = [_VmPlan(uuid, "", _hints(vault, ids[0])) for uuid, ids in by_vm.items()]
    for vm in vms:
        name = vm.hints.get("vm_name", "")
        vm.name = name if _file_safe(name) else vm.uuid  # it names files: never a path of its own
    if req.vms is None:
        chosen = vms
    else:
        if isinstance(req.vms, str):
            raise InvalidInput("vms must be a collection of names or UUIDs, not one string", code="INVALID_INPUT")
        chosen = []
        for wanted in req.vms:
            match = [vm for vm in vms if wanted in (vm.uuid, vm.name)]
            if not match:
                listed = ", ".join(f"{vm.name} ({vm.uuid})" for vm in vms)
                raise NotFound(f"run {req.job}/{req.run} holds no VM {wanted!r}; it holds {listed}",
                               code="VM_NOT_IN_BACKUP", vm=wanted)
            if match[0] not in chosen:
                chosen.append(match[0])
    if req.disks is not None and isinstance(req.disks, str):
        raise InvalidInput("disks must be a collection of targets, not one string", code="INVALID_INPUT")
    wanted_disks = set(req.disks) if req.disks is not None else None
    if wanted_disks is not None and not wanted_disks:
        raise InvalidInput("the disk selection is empty", code="INVALID_INPUT")
    for vm in chosen:
        held = {bid.resource: bid for bid in by_vm[vm.uuid]}
        if wanted_disks is not None:
            unknown = sorted(wanted_disks - set(held))
            if unknown:
                raise NotFound(f"VM {vm.name} ({vm.uuid}) has no disk {', '.join(unknown)} in run "
                               f"{req.job}/{req.run}; it holds {', '.join(sorted(held))}",
                               code="DISK_NOT_IN_BACKUP", vm=vm.uuid, disks=unknown)
        for target in sorted(held, key=lambda t: (len(t), t)):
            if wanted_disks is None or target in wanted_disks:
                bid = held[target]
                vm.disks.append(_DiskPlan(bid, vault.read_manifest(bid), "", ""))
    return chosen


def _file_safe(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def _check_target_dir(target_dir: str | os.PathLike[str] | None) -> Path:
    if target_dir is None:
        raise InvalidInput("this restore type needs a target directory", code="TARGET_DIR_REQUIRED")
    path = Path(target_dir)
    if not path.exists():
        raise NotFound(f"{path}: no such directory", code="TARGET_DIR_NOT_FOUND", path=str(path))
    if not path.is_dir():
        raise InvalidInput(f"{path} is not a directory", code="TARGET_DIR_INVALID", path=str(path))
    try:  # os.access says yes to root on a read-only mount; only writing tells
        fd, probe = tempfile.mkstemp(prefix=".raksha-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidInput(f"{path} is not writable: {exc.strerror}", code="TARGET_DIR_NOT_WRITABLE",
                           path=str(path)) from None
    return path


def _check_outputs(paths: list[str]) -> None:
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise InvalidInput(f"two restored files would both be {p}", code="OUTPUT_COLLISION", path=p)
        seen.add(p)
    taken = [p for p in paths if os.path.lexists(p)]
    if taken:
        raise AlreadyExists(f"{', '.join(taken)} exist(s); nothing was restored", code="OUTPUT_EXISTS", paths=taken)


def _check_reachable(conn: libvirt.virConnect, target_dir: Path, domain_xml: str,
                     owners: dict[str, tuple[int, int] | None]) -> None:
    """The new domain's QEMU can open its disks in ``target_dir``: said now, not after writing them.
    ``owners``: QEMU's user by domain type, as found so far in this restore (the capabilities are read once)."""
    try:
        virt_type = ET.fromstring(domain_xml).get("type") or "kvm"
    except ET.ParseError:
        return  # defining it says what is wrong
    if virt_type not in owners:
        with _libvirt("reading the host's capabilities"):
            owners[virt_type] = qemu_user(conn, virt_type)
    owner = owners[virt_type]
    blocked = blocking_dir(str(target_dir), *owner) if owner is not None else None
    if owner is not None and blocked is not None:
        st = os.stat(blocked)
        raise InvalidInput(
            f"QEMU runs as {describe(*owner)} and could not open disks in {target_dir}: it may not pass "
            f"through {blocked} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}); "
            "let it pass (chmod o+x) or restore elsewhere",
            code="TARGET_DIR_UNREACHABLE", path=str(target_dir), blocked=blocked)


def _plan_new_vm(conn: libvirt.virConnect, req: RestoreRequest, vms: list[_VmPlan], fmt: str) -> None:
    target_dir = _check_target_dir(req.target_dir)
    new_names: set[str] = set()
    owners: dict[str, tuple[int, int] | None] = {}
    for vm in vms:
        if "domain_xml" not in vm.hints:
            raise InvalidInput(f"run {req.job}/{req.run} saved no domain definition for {vm.name} ({vm.uuid})",
                               code="DOMAIN_XML_MISSING", vm=vm.uuid)
        _check_reachable(conn, target_dir, vm.hints["domain_xml"], owners)
        vm.new_name = req.names.get(vm.uuid) or req.names.get(vm.name) or f"{vm.name}-{req.run}"
        if vm.new_name in new_names:
            raise InvalidInput(f"two restored VMs would both be named {vm.new_name!r}", code="DOMAIN_NAME_COLLISION")
        new_names.add(vm.new_name)
        if not _file_safe(vm.new_name):
            raise InvalidInput(f"{vm.new_name!r} cannot name a domain and its disk files", code="DOMAIN_NAME_INVALID")
        if _domain_named(conn, vm.new_name) is not None:
            raise AlreadyExists(f"a domain named {vm.new_name!r} exists", code="DOMAIN_EXISTS", name=vm.new_name)
        for d in vm.disks:
            d.output, d.fmt = str(target_dir / f"{vm.new_name}-{d.id.resource}.{fmt}"), fmt
    _check_outputs([d.output for vm in vms for d in vm.disks])


def _plan_files(req: RestoreRequest, vms: list[_VmPlan], fmt: str) -> None:
    target_dir = _check_target_dir(req.target_dir)
    for vm in vms:
        for d in vm.disks:
            d.output, d.fmt = str(target_dir / f"{vm.name}-{d.id.resource}.{fmt}"), fmt
        if "domain_xml" in vm.hints:
            vm.files[str(target_dir / f"{vm.name}.xml")] = vm.hints["domain_xml"]
        if "interfaces" in vm.hints:
            interfaces = json.loads(vm.hints["interfaces"])
            vm.files[str(target_dir / f"{vm.name}-interfaces.json")] = json.dumps(interfaces, indent=2) + "\n"
    _check_outputs([d.output for vm in vms for d in vm.disks] + [f for vm in vms for f in vm.files])


def _plan_in_place(conn: libvirt.virConnect, vms: list[_VmPlan]) -> None:
    for vm in vms:
        try:
            vm.domain = conn.lookupByUUIDString(vm.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _NOT_FOUND:
                raise NotFound(f"no domain with UUID {vm.uuid} ({vm.name}) to restore in place",
                               code="VM_NOT_FOUND", vm=vm.uuid) from None
            raise translate_libvirt_error(exc, f"looking up domain {vm.uuid}") from None
        dom = vm.domain
        with _libvirt(f"reading domain {vm.name}"):
            xml = dom.XMLDesc(0)
            current: dict[str, DiskInfo] = {d.target: d for d in domain_disks(xml)}
            chains = disk_chains(xml)
            persistent = dom.isPersistent()
            name = dom.name()
        missing = [d.id.resource for d in vm.disks if d.id.resource not in current]
        if missing:
            raise InvalidInput(f"domain {name} has no disk {', '.join(missing)} any more", code="DISK_MISMATCH",
                               vm=vm.uuid, disks=missing)
        if not persistent:
            raise InvalidInput(f"domain {name} is transient: it would vanish when shut off; restore it as a "
                               "new domain instead", code="DOMAIN_TRANSIENT", vm=vm.uuid)
        for d in vm.disks:
            disk = current[d.id.resource]
            d.output, d.fmt, d.source_type = disk.path, ("qcow2" if disk.format == "qcow2" else "raw"), disk.source_type
            chain = _with_backing(chains.get(d.id.resource, []))
            base = next((layer for layer in chain if not is_overlay(layer.path)), None)
            if chain and is_overlay(chain[0].path) and base is not None:
                d.output, d.fmt, d.source_type = base.path, ("qcow2" if base.format == "qcow2" else "raw"), \
                    base.source_type
                d.overlays = [layer.path for layer in chain[: chain.index(base)]]


# -- doing it ---------------------------------------------------------------------------------------


class _Meter:
    """Bytes done across every disk of the request, fed by each disk's own restore progress."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self._progress = Progress("restore", total, callback)
        self._lock = threading.Lock()
        self._done: dict[str, int] = {}

    def _advance(self, key: str, done: int) -> None:
        with self._lock:  # events of one disk can arrive out of order from its worker threads
            delta = done - self._done.get(key, 0)
            if delta <= 0:
                return
            self._done[key] = done
        self._progress.add(delta)

    def disk(self, key: str) -> Callable[[ProgressEvent], None]:
        return lambda event: self._advance(key, event.done)

    def expect(self, planned: int, now: int) -> None:
        """A disk will take ``now`` bytes where ``planned`` were counted (it is written by changed chunks)."""
        self._progress.adjust_total(now - planned)

    def disk_done(self, key: str, written: int) -> None:
        self._advance(key, written)

    def finish(self) -> None:
        self._progress.finish()


def _restore_disk(vault: Vault, d: _DiskPlan, meter: _Meter, *, overwrite: bool,
                  threads: int | None) -> RestoredDisk:
    key = str(d.id)
    res = restore_backup(vault, d.id, d.output, fmt=d.fmt, overwrite=overwrite, threads=threads,
                         progress=meter.disk(key))
    meter.disk_done(key, res.bytes_written)
    disk = RestoredDisk(d.id.resource, key, d.output, d.fmt, res.virtual_size, res.bytes_written, d.chunks,
                        res.chunks_verified, res.content_digest)
    if not disk.verified:
        if not overwrite:
            _remove([d.output])
        raise VaultCorrupt(f"restoring {key} verified {disk.chunks_verified} of its {disk.chunks} chunks",
                           code="RESTORE_UNVERIFIED", backup=key, output=d.output)
    return disk


def _read_back(vault: Vault, disk: RestoredDisk) -> None:
    """Prove a restored disk by reading it back: RESTORE_MISMATCH unless it holds its backup chunk by chunk."""
    source = open_source(disk.path, disk.format)
    try:
        report = compare_image(vault, BackupId.parse(disk.backup_id), source)
    finally:
        source.close()
    disk.read_back = report.identical
    if not report.identical:
        raise VaultCorrupt(f"{disk.path}, read back, differs from backup {disk.backup_id}: {report.summary()}",
                           code="RESTORE_MISMATCH", backup=disk.backup_id, output=disk.path,
                           chunks=report.first_differing[:10])


def _remove(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _do_new_vm(conn: libvirt.virConnect, vault: Vault, req: RestoreRequest, vm: _VmPlan, meter: _Meter) -> RestoredVm:
    out = RestoredVm(vm.name, vm.uuid, domain=vm.new_name)
    made: list[str] = []
    dom = None
    try:
        for d in vm.disks:
            out.disks.append(_restore_disk(vault, d, meter, overwrite=False, threads=req.threads))
            if req.read_back:
                _read_back(vault, out.disks[-1])
            made.append(d.output)
        xml = new_domain_xml(vm.hints["domain_xml"], vm.new_name, {d.id.resource: (d.output, d.fmt)
                                                                  for d in vm.disks}, keep_macs=req.keep_macs)
        with _libvirt(f"defining restored domain {vm.new_name}"):
            dom = conn.defineXML(xml)
            out.uuid = dom.UUIDString()
        if req.start:
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"restored domain {vm.new_name} did not start: {exc.get_error_message()}",
                                      code="DOMAIN_START_FAILED", name=vm.new_name,
                                      libvirt_code=exc.get_error_code()) from None
            out.started = True
    except BaseException:
        if dom is not None:  # roll back: no half-made VM, no orphaned images; a retry starts clean
            try:
                dom.undefine()
            except libvirt.libvirtError:
                pass
        _remove(made)
        raise
    return out


def _do_files(vault: Vault, req: RestoreRequest, vm: _VmPlan, meter: _Meter) -> RestoredVm:
    out = RestoredVm(vm.name, vm.uuid)
    try:
        for d in vm.disks:
            out.disks.append(_restore_disk(vault, d, meter, overwrite=False, threads=req.threads))
            if req.read_back:
                _read_back(vault, out.disks[-1])
        for path, content in vm.files.items():
            try:
                f = open(path, "x", encoding="utf-8")  # noqa: SIM115 - "x": never clobber a file that appeared
            except FileExistsError:
                raise AlreadyExists(f"{path} appeared while restoring", code="OUTPUT_EXISTS", paths=[path]) from None
            with f:
                out.files.append(path)
                f.write(content)
    except BaseException:
        _remove([d.path for d in out.disks] + out.files)  # this VM's files all or none: a retry starts clean
        raise
    return out


def _rollbacks(vault: Vault, req: RestoreRequest, vm: _VmPlan,
               raw_bitmaps: RawBitmaps) -> tuple[dict[str, Rollback], dict[str, str], bool]:
    """How each disk is put back (rollback.py): the disks rolled back by changed chunks, why each other one is
    rewritten whole, and whether the domain keeps its checkpoints.

    The qcow2 disks go all or none: if one cannot, each is rewritten whole and the checkpoints are forgotten
    (a rolled back disk would keep bitmaps no checkpoint owns). Raw disks, which no checkpoint tracks, go
    each on its own, by the QEMU bitmaps read before the shut-off."""
    dom = vm.domain
    assert dom is not None
    if not req.changed_only:
        return {}, {d.id.resource: "rewritten whole, as asked" for d in vm.disks}, False
    plans: dict[str, Rollback] = {}
    whys: dict[str, str] = {}
    keep = True
    try:
        for d in vm.disks:
            if d.overlays:
                plan: Rollback | str = "the snapshot strategy's overlays are on it"
            elif d.fmt == "qcow2":
                plan = plan_rollback(vault, dom, req.job, d.id, d.manifest, d.output)
            else:
                plan = plan_raw_rollback(vault, req.job, d.id, d.manifest, d.output, raw_bitmaps.get(d.id.resource))
            if isinstance(plan, str):
                whys[d.id.resource] = f"rewritten whole: not by changed chunks: {plan}"
                keep = keep and d.fmt != "qcow2"
            else:
                plans[d.id.resource] = plan
        if not keep:  # a qcow2 disk cannot: none of them is rolled back by changed chunks
            for d in vm.disks:
                if d.fmt == "qcow2" and d.id.resource in plans:
                    plans.pop(d.id.resource).target.close()
                    whys[d.id.resource] = "rewritten whole: another qcow2 disk of the domain cannot be rolled back " \
                                          "by changed chunks, and its checkpoints are forgotten"
    except BaseException:
        for done in plans.values():
            done.target.close()
        raise
    for target, why in whys.items():
        log.info("restore in place of %s: %s: %s", vm.name, target, why)
    return plans, whys, keep


def _roll_back_disk(vault: Vault, d: _DiskPlan, plan: Rollback, meter: _Meter, *, threads: int | None) -> RestoredDisk:
    key = str(d.id)
    meter.expect(d.data_bytes, plan.bytes_to_write(d.manifest))
    try:
        res = restore_chunks(vault, d.id, plan.target, plan.chunks, parts=plan.parts, threads=threads,
                             progress=meter.disk(key))
    finally:
        plan.target.close()  # qemu-nbd writes the bitmaps back as it exits
    meter.disk_done(key, res.bytes_written)
    return RestoredDisk(d.id.resource, key, d.output, d.fmt, res.virtual_size, res.bytes_written,
                        res.blobs, res.chunks_verified, res.content_digest, method="changed",
                        how=plan.describe())


def _do_in_place(vault: Vault, req: RestoreRequest, vm: _VmPlan, meter: _Meter) -> RestoredVm:
    dom = vm.domain
    assert dom is not None
    raw = [d.id.resource for d in vm.disks if d.fmt != "qcow2" and not d.overlays]
    # Raw disks' bitmaps live in QEMU's memory: read them first (the domain is paused for it).
    raw_bitmaps = read_raw_bitmaps(dom, req.job, raw) if req.changed_only else {}
    with _libvirt(f"shutting off domain {vm.name}"):
        out = RestoredVm(vm.name, vm.uuid, domain=dom.name(), uuid=dom.UUIDString())
        if dom.isActive():
            dom.destroy()  # a clean shutdown needs a cooperating guest; the disks are overwritten anyway
    # The domain is off: its qcow2 disks' bitmaps are saved in the images.
    rollbacks, whys, keep_checkpoints = _rollbacks(vault, req, vm, raw_bitmaps)
    with _libvirt(f"preparing domain {vm.name}"):
        if not keep_checkpoints:
            # The replaced images carry none of the old bitmaps: forget the checkpoints, so the next backup
            # reads in full (and says why) instead of failing on a bitmap that no longer exists.
            for cp in dom.listAllCheckpoints():
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        bases = {d.id.resource: d for d in vm.disks if d.overlays}
        if bases:  # before any write: never the restored base under an overlay of later writes
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            dom.connect().defineXML(_point_at_bases(inactive, bases))
    try:
        for d in vm.disks:
            plan = rollbacks.pop(d.id.resource, None)
            if plan is not None:
                out.disks.append(_roll_back_disk(vault, d, plan, meter, threads=req.threads))
            else:
                out.disks.append(_restore_disk(vault, d, meter, overwrite=True, threads=req.threads))
                out.disks[-1].how = whys.get(d.id.resource, "")
            if req.read_back:
                _read_back(vault, out.disks[-1])
    finally:
        for left in rollbacks.values():
            left.target.close()
    for path in (p for d in vm.disks for p in d.overlays):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # unused now: only its space is lost
            log.warning("restore of %s: could not remove the overlay %s, which nothing uses now: %s",
                        vm.name, path, exc)
    if req.start:
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"domain {out.domain} did not start after its disks were restored: "
                                  f"{exc.get_error_message()}", code="DOMAIN_START_FAILED", name=out.domain,
                                  libvirt_code=exc.get_error_code()) from None
        out.started = True
    return out


def restore(conn: libvirt.virConnect | None, vault: Vault, request: RestoreRequest,
            *, progress: ProgressCallback | None = None) -> RestoreReport:
    """Restore a backup point as ``request`` says; ``conn`` may be None for ``files``."""
    start = time.monotonic()
    req = request
    if req.type not in RESTORE_TYPES:
        raise InvalidInput(f"unknown restore type {req.type!r} ({', '.join(RESTORE_TYPES)})",
                           code="RESTORE_TYPE_INVALID")
    if req.type != IN_PLACE and req.fmt not in FORMATS:
        raise InvalidInput(f"restore format {req.fmt!r} is not supported (raw or qcow2)", code="INVALID_FORMAT")
    if req.type != FILES and conn is None:
        raise InvalidInput(f"a {req.type} restore needs a libvirt connection", code="INVALID_INPUT")
    vms = _select_vms(vault, req, _run_vms(vault, req.job, req.run))
    if req.type == NEW_VM:
        assert conn is not None
        _plan_new_vm(conn, req, vms, req.fmt)
    elif req.type == FILES:
        _plan_files(req, vms, req.fmt)
    else:
        assert conn is not None
        _plan_in_place(conn, vms)
    meter = _Meter(sum(d.data_bytes for vm in vms for d in vm.disks), progress)
    report = RestoreReport(req.job, req.run, req.type)
    for vm in vms:
        try:
            if req.type == NEW_VM:
                assert conn is not None
                report.vms.append(_do_new_vm(conn, vault, req, vm, meter))
            elif req.type == FILES:
                report.vms.append(_do_files(vault, req, vm, meter))
            else:
                report.vms.append(_do_in_place(vault, req, vm, meter))
        except RakshaError as err:  # say what was finished before the failure (it stays) and where it failed
            err.details.setdefault("failed_vm", vm.uuid)
            err.details.setdefault("restored", [done.to_dict() for done in report.vms])
            raise
    meter.finish()
    report.seconds = time.monotonic() - start
    return report


# -- one-VM shorthands (the first API; kept) --------------------------------------------------------


def _one(report: RestoreReport) -> RestoredDomain:
    (vm,) = report.vms
    return RestoredDomain(vm.domain or vm.source_name, vm.uuid or "", {d.target: d.path for d in vm.disks},
                          sum(d.chunks_verified for d in vm.disks), vm.started)


def restore_domain(conn: libvirt.virConnect, vault: Vault, job: str, run: str, vm: str, *, name: str,
                   target_dir: Path, fmt: str = "qcow2", only_disks: set[str] | None = None,
                   keep_macs: bool = False, start: bool = True,
                   progress: ProgressCallback | None = None) -> RestoredDomain:
    """Restore VM ``vm`` (its UUID in the backup ids, or its name) of run ``job/run`` as the new domain ``name``."""
    return _one(restore(conn, vault, RestoreRequest(job, run, NEW_VM, vms=[vm], disks=only_disks,
                                                    target_dir=target_dir, fmt=fmt, names={vm: name},
                                                    keep_macs=keep_macs, start=start), progress=progress))


def restore_in_place(conn: libvirt.virConnect, vault: Vault, job: str, run: str, vm: str,
                     *, only_disks: set[str] | None = None, start: bool = True,
                     progress: ProgressCallback | None = None) -> RestoredDomain:
    """Put a domain's disks back to run ``job/run``: the domain is shut off, each disk gets the chunks that
    differ written in place where its dirty bitmap allows (ADR 0022), else is replaced by a verified restore
    (written beside it, renamed over it only when complete), and it is started again."""
    return _one(restore(conn, vault, RestoreRequest(job, run, IN_PLACE, vms=[vm], disks=only_disks, start=start),
                        progress=progress))
