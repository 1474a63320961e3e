"""Consistent pull-mode backups of several domains at once with libvirt checkpoints.

Freeze every guest that has an agent, start every domain's backup job (one job
covers all disks of a domain, atomically), thaw, then read each disk's NBD
export. The run records the consistency it reached per domain and the freeze
window. Every pull job is ended (abortJob) whatever happens, and no guest is
left frozen.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import libvirt
import libvirt_qemu

from raksha.domain.errors import SourceError
from raksha.hypervisor.disks import DiskInfo, domain_disks
from raksha.vault.sources.nbd import NbdSource

CRASH, FILESYSTEM = "crash", "filesystem"
WORKDIR_PREFIX = "raksha-pull-"  # + "<pid>-": tells whose pull job an export socket belongs to
_SOCKET_OWNER = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_stale_job(dom: libvirt.virDomain) -> bool:
    """End a pull backup left open by a Raksha process that died (SIGKILL, a crash); thaw its guest.

    Only a job whose export socket lies in a dead process's work directory is touched:
    another tool's job, or a live Raksha run's, is left alone (and the new job will fail to start).
    """
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False  # no backup job
    owner = _SOCKET_OWNER.search(xml)
    if owner is None or _alive(int(owner.group(1))):
        return False
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass
    try:
        if _agent(dom, "guest-fsfreeze-status") == "frozen":
            _agent(dom, "guest-fsfreeze-thaw")
    except libvirt.libvirtError:
        pass  # no agent: nothing can be frozen
    return True


@dataclass
class DomainPoint:
    """One domain's share of a consistency group: its disks' exports and what was reached."""

    domain: libvirt.virDomain
    disks: list[DiskInfo]
    socket: str
    checkpoint: str
    parent_checkpoint: str | None
    excluded: list[DiskInfo] = field(default_factory=list)
    consistency: str = CRASH
    why: str = ""

    def source(self, disk: DiskInfo) -> NbdSource:
        bitmap = (f"qemu:dirty-bitmap:backup-{disk.target}"
                  if self.parent_checkpoint and tracked(disk) else None)
        return NbdSource(self.socket, path=f"{self.domain.name()}:{disk.target}", fmt=disk.format,
                         export_name=disk.target, dirty_bitmap=bitmap)


@dataclass
class GroupPoint:
    domains: list[DomainPoint]
    freeze_ms: float = 0.0
    started_at: float = field(default_factory=time.time)


def _agent(dom: libvirt.virDomain, command: str, timeout: int = 10) -> Any:
    import json

    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command}), timeout, 0)
    return json.loads(reply)["return"]


def tracked(disk: DiskInfo) -> bool:
    """Whether libvirt keeps a persistent dirty bitmap for the disk: checkpoints need qcow2."""
    return disk.format == "qcow2"


def _backup_xml(p: DomainPoint, scratch_dir: str) -> str:
    incremental = f"<incremental>{p.parent_checkpoint}</incremental>" if p.parent_checkpoint else ""
    parts = []
    for d in p.disks:
        # An untracked (raw) disk has no bitmap to be incremental from: it is exported whole.
        mode = " backupmode='full'" if p.parent_checkpoint and not tracked(d) else ""
        scratch = os.path.join(scratch_dir, d.target + ".scratch")
        parts.append(f"<disk name='{d.target}' backup='yes' type='file'{mode}><scratch file='{scratch}'/></disk>")
    parts += [f"<disk name='{d.target}' backup='no'/>" for d in p.excluded]
    return (f"<domainbackup mode='pull'>{incremental}<server transport='unix' socket='{p.socket}'/>"
            f"<disks>{''.join(parts)}</disks></domainbackup>")


def _checkpoint_xml(name: str, p: DomainPoint) -> str:
    disk_xml = "".join(f"<disk name='{d.target}' checkpoint='{'bitmap' if tracked(d) else 'no'}'/>"
                       for d in p.disks) + "".join(f"<disk name='{d.target}' checkpoint='no'/>" for d in p.excluded)
    return f"<domaincheckpoint><name>{name}</name><disks>{disk_xml}</disks></domaincheckpoint>"


@contextmanager
def consistency_group(domains: list[tuple[libvirt.virDomain, str | None]], checkpoint: str,
                      *, freeze: bool = True, exclude: dict[str, set[str]] | None = None) -> Iterator[GroupPoint]:
    """Take one point in time over ``domains`` (each with the checkpoint it is incremental to, or None).

    ``exclude`` maps a domain name to disk targets left out (and recorded). Yields while every
    domain's pull job is open; ends them all on exit.
    """
    for dom, _parent in domains:
        end_stale_job(dom)
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
    points = []
    for i, (dom, parent) in enumerate(domains):
        skip = (exclude or {}).get(dom.name(), set())
        disks = domain_disks(dom.XMLDesc(0))
        points.append(DomainPoint(dom, [d for d in disks if d.target not in skip], os.path.join(workdir, f"{i}.sock"),
                                  checkpoint, parent, excluded=[d for d in disks if d.target in skip]))
    frozen: list[DomainPoint] = []
    started: list[DomainPoint] = []
    group = GroupPoint(points)
    try:
        t0 = time.monotonic()
        if freeze:
            for p in points:
                try:
                    if _agent(p.domain, "guest-fsfreeze-status") == "frozen":
                        # Left frozen by a run that died inside its freeze window: never ours to keep.
                        _agent(p.domain, "guest-fsfreeze-thaw")
                        p.why = "found frozen by an interrupted run; thawed first. "
                    _agent(p.domain, "guest-fsfreeze-freeze")
                    frozen.append(p)
                except libvirt.libvirtError as exc:
                    p.why += f"no freeze: {exc.get_error_message()}"
        try:
            for p in points:
                scratch = os.path.join(workdir, p.domain.UUIDString())
                os.makedirs(scratch, exist_ok=True)
                p.domain.backupBegin(_backup_xml(p, scratch), _checkpoint_xml(checkpoint, p), 0)
                started.append(p)
        finally:
            for p in frozen:
                try:
                    _agent(p.domain, "guest-fsfreeze-thaw")
                    p.consistency = FILESYSTEM if p in started else CRASH
                except libvirt.libvirtError as exc:
                    p.why = f"thaw failed: {exc.get_error_message()}"
            group.freeze_ms = (time.monotonic() - t0) * 1000
        yield group
    except libvirt.libvirtError as exc:
        raise SourceError(f"pull backup failed: {exc.get_error_message()}") from exc
    finally:
        for p in started:
            try:
                p.domain.abortJob()
            except libvirt.libvirtError:
                pass  # the domain vanished; nothing left to end
        shutil.rmtree(workdir, ignore_errors=True)
