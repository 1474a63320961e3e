"""Consistent pull-mode backups of several domains at once, with changed-block tracking for every disk.

Freeze every guest that has an agent, start every domain's backup job (one job
covers all disks of a domain, atomically), thaw, then read each disk's NBD
export. Freezes, job starts and thaws each go to all domains at once (strategy.each), so the window
does not grow with the number of VMs. The run records the consistency it reached per domain and the
freeze window. Every pull job is ended (abortJob) whatever happens, and no guest is left frozen.

How each disk's changes are found (docs/design/changed-block-tracking.md):

- qcow2 disks: libvirt checkpoints (persistent dirty bitmaps in the image). Raksha adds each run's
  bitmap itself, at 4 KiB (libvirt's would have the 64 KiB cluster's granularity), before the point in
  time, and has libvirt take it as the checkpoint's (a redefinition) while the disks are read (ADR 0028).
- raw files and block devices, where libvirt refuses checkpoints: a
  non-persistent QEMU dirty bitmap per run, managed over QMP. The bitmap of run
  N is added before run N's ``backupBegin`` (the point in time); run N+1 copies
  it after its own ``backupBegin`` and reads the copy's extents over NBD. A
  QEMU restart or a migration loses it, and that disk is read in full once.

A disk whose base is missing or inconsistent is read in full, with the reason
recorded, instead of failing the run. A domain that fails (its backup job does
not start, or the caller reports it failed) keeps its previous base: the new
checkpoint and bitmap are dropped, the old ones kept.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import libvirt
import libvirt_qemu

from raksha.domain.errors import HypervisorError, RakshaError
from raksha.hypervisor.disks import DiskInfo, backing_chain, domain_disks
from raksha.hypervisor.errors import translate, vm_gone
from raksha.hypervisor.qemu_access import parse_dac_label
from raksha.hypervisor.qemu_blocks import (
    READ_SUFFIX,
    QmpError,
    image_chain,
    node_bitmaps,
    qmp,
    read_bitmap,
    recording,
    top_nodes,
    try_qmp,
)
from raksha.hypervisor.strategy import (
    CRASH,
    FILESYSTEM,
    HookRun,
    Hooks,
    each,
    freeze_guests,
    post_thaw,
    pre_freeze,
    thaw_guests,
)
from raksha.vault.processes import owner_alive, remove_dirs_of_dead_owners
from raksha.vault.sources.base import Extent
from raksha.vault.sources.nbd import NbdSource
from raksha.vault.threads import spawn

log = logging.getLogger(__name__)

WORKDIR_PREFIX = "raksha-pull-"  # + "<pid>-": tells whose pull job an export socket belongs to
_SOCKET_OWNER = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-")
# Where a run's work directory goes: QEMU creates the export sockets there and copies the guests' data
# into the scratch images before it is overwritten. On disk (a tmpfs /tmp would hold that in memory) and
# visible to libvirtd and QEMU, as virtnbdbackup's default is.
PULL_DIR_ENV = "RAKSHA_PULL_DIR"
DEFAULT_PULL_DIR = "/var/tmp"

# How a disk's changes are tracked (recorded per disk as the hint "tracking_method").
CHECKPOINT = "libvirt-checkpoint"  # qcow2: libvirt checkpoint, persistent bitmap in the image
QEMU_BITMAP = "qemu-dirty-bitmap"  # raw file or block device: non-persistent QEMU bitmap over QMP
UNTRACKED = "none"  # no tracking could be set up: read in full every time

BITMAP_GRANULARITY = 4096  # bytes per bit: reads equal the guest's 4 KiB writes
MAX_BITMAP_BYTES = 32 << 20  # per bitmap; the granularity doubles past 1 TiB to stay under it
# Raksha before ADR 0028 kept a 4 KiB bitmap "<checkpoint>~fine" beside each checkpoint's own: an image may
# still hold one. It is no base any more; it goes with its checkpoint (a restore in place still uses it).
LEGACY_FINE_SUFFIX = "~fine"


def bitmap_granularity(size: int) -> int:
    """4 KiB (32 KiB of QEMU memory per GiB of disk) up to 1 TiB, coarser beyond so a bitmap stays <= 32 MiB."""
    granularity = BITMAP_GRANULARITY
    while size > granularity * 8 * MAX_BITMAP_BYTES:
        granularity *= 2
    return granularity


def end_stale_job(dom: libvirt.virDomain) -> bool:
    """End a pull backup left open by a Raksha process that died (SIGKILL, a crash); thaw its guest.

    Only a job whose export socket lies in a dead process's work directory is touched:
    another tool's job, or a live Raksha run's, is left alone (and the new job will fail to start).
    """
    return _end_stale_job(dom) is _Job.ENDED


class _Job(enum.Enum):
    """What ``_end_stale_job`` found of a domain's backup job."""

    NONE = "none"
    ENDED = "ended"  # a dead Raksha process's, ended now
    KEPT = "kept"  # another's, still running (or one that would not end)


def _end_stale_job(dom: libvirt.virDomain) -> _Job:
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return _Job.NONE
    owner = _SOCKET_OWNER.search(xml)
    socket = re.search(r"socket='([^']+)'", xml)
    try:  # the owner made its work directory after it started, before it began the job
        made = os.stat(os.path.dirname(socket.group(1))).st_mtime if socket else time.time()
    except OSError:
        made = time.time()
    if owner is None or owner_alive(int(owner.group(1)), made):
        return _Job.KEPT
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass
    ended = _wait_job_end(dom)
    try:
        if _agent(dom, "guest-fsfreeze-status") == "frozen":
            _agent(dom, "guest-fsfreeze-thaw")
    except libvirt.libvirtError:
        pass  # no agent: nothing can be frozen
    return _Job.ENDED if ended else _Job.KEPT


@dataclass
class DiskPlan:
    """How one disk's changes are found in this run, and what the run found."""

    method: str
    incremental: bool = False
    note: str = "full read"  # the "tracking" hint: how the disk was read, and why
    node: str | None = None  # QEMU node holding the disk's bitmaps
    size: int = 0
    granularity: int = BITMAP_GRANULARITY
    added: bool = False  # this run's bitmap (named as the run) was added to ``node``
    extents: Sequence[Extent] | None = None  # a raw disk's changed extents, read from the parent's bitmap
    chain: list[dict[str, str]] | None = None  # the image and its backing files as QEMU has them open
    # Bitmaps of the parent's and retired runs that deleting their checkpoints would leave: an older Raksha's
    # ``~fine``, and one whose checkpoint was never made (libvirt refused it). Removed after a good run.
    strays: list[str] = field(default_factory=list)


@dataclass
class DomainPoint:
    """One domain's share of a consistency group: its disks' exports and what was reached."""

    domain: libvirt.virDomain
    disks: list[DiskInfo]
    socket: str
    checkpoint: str
    parent_checkpoint: str | None  # the libvirt checkpoint the job is incremental from, if any disk uses it
    excluded: list[DiskInfo] = field(default_factory=list)
    consistency: str = CRASH
    why: str = ""
    parent: str | None = None  # the parent run's checkpoint and bitmap name, as asked
    retire: list[str] = field(default_factory=list)  # older runs' checkpoint/bitmap names, dropped after a good run
    plans: dict[str, DiskPlan] = field(default_factory=dict)
    error: RakshaError | None = None  # set when this domain failed: its previous base is kept
    started: bool = False
    qemu_owner: tuple[int, int] | None = None  # uid, gid QEMU runs as (None: unknown)
    scratch_made: bool = False  # its disks' scratch images are ready: libvirt reuses them
    checkpoint_made: bool = False  # this run's libvirt checkpoint exists (made before the window or beside the reads)
    checkpoint_refused: str = ""  # what went wrong making it, and what the next run does for it (a warning)
    idle: bool = True  # no backup job was running on the domain when the run began
    inactive_xml: str = ""  # the domain's definition (secure) as the run began
    live_xml: str = ""  # the running domain's XML as the run began (its disks' device aliases)
    checkpoints: set[str] | None = None  # the names of the domain's checkpoints, listed as the run was planned
    # Ends the pull job: early (reads_done) or at the group's exit; and what went wrong doing it.
    _ending: Future[None] | None = field(default=None, init=False, repr=False)
    _end_errors: list[str] = field(default_factory=list, init=False, repr=False)
    _later: list[Future[None]] = field(default_factory=list, init=False, repr=False)

    def has_checkpoint(self, name: str) -> bool:
        """Whether the domain had checkpoint ``name`` as the run was planned (asked of libvirt if not listed)."""
        return name in self.checkpoints if self.checkpoints is not None else _has_checkpoint(self.domain, name)

    def plan(self, disk: DiskInfo) -> DiskPlan:
        return self.plans.setdefault(disk.target, DiskPlan(CHECKPOINT if tracked(disk) else UNTRACKED))

    def incremental(self, disk: DiskInfo) -> bool:
        return self.plan(disk).incremental

    def tracking(self, disk: DiskInfo) -> str:
        return self.plan(disk).note

    def fail(self, error: RakshaError) -> None:
        """The caller could not back this domain up: drop this run's checkpoint and bitmaps on exit."""
        self.error = error

    def backing_chain(self, disk: DiskInfo) -> list[dict[str, str]]:
        """From QEMU's view of the disk when the run was planned, else from the image files."""
        plan = self.plans.get(disk.target)
        return plan.chain if plan is not None and plan.chain is not None else backing_chain(disk.path)

    def definition(self) -> str:
        """Fetched as the run began: asked for during the transfer, libvirt would make it wait for the
        domain's job of making the run's checkpoint."""
        return self.inactive_xml

    def reads_done(self) -> None:
        """Every disk of this domain has been read: its pull job ends now, while the vault commits. The
        guest's writes stop paying copy-before-write sooner, and the group's exit only waits for it."""
        self.end_job_soon()

    def end_job_soon(self) -> None:
        """Start ending the pull job in the background, once."""
        if self.started and self._ending is None:
            self._ending = spawn(self._end_job, name=f"raksha-end-{self.domain.name()}")

    def end_job(self) -> list[str]:
        """End the pull job (unless under way already) and wait until it has ended; what went wrong."""
        self.end_job_soon()
        if self._ending is not None and (exc := self._ending.exception()) is not None:
            self._end_errors.append(f"{self.domain.name()}: ending the pull job failed: {exc}")
        return self._end_errors

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (QMP clean-up that nothing waits for) beside the transfer; the job's end waits for it."""
        self._later.append(spawn(fn, name=f"raksha-later-{self.domain.name()}"))

    def _end_job(self) -> None:
        for t in self._later:
            if (exc := t.exception()) is not None:  # nothing waited for it: a leftover at worst, said
                log.warning("%s: clean-up beside the transfer failed: %s", self.domain.name(), exc)
        try:
            self.domain.abortJob()
        except libvirt.libvirtError as exc:
            if not vm_gone(self.domain):  # a vanished domain has nothing left to end
                self._end_errors.append(f"{self.domain.name()}: ending the pull job failed: "
                                        f"{exc.get_error_message()}")
        if not _wait_job_end(self.domain):
            self._end_errors.append(f"{self.domain.name()}: the pull job had not ended 60 s after it was "
                                    "aborted (virsh domjobabort)")

    def source(self, disk: DiskInfo) -> NbdSource:
        plan = self.plan(disk)
        bitmap = (f"qemu:dirty-bitmap:backup-{disk.target}"
                  if plan.method == CHECKPOINT and plan.incremental else None)
        return NbdSource(self.socket, path=f"{self.domain.name()}:{disk.target}", fmt=disk.format,
                         export_name=disk.target, dirty_bitmap=bitmap)

    def changed_extents(self, disk: DiskInfo, source: NbdSource) -> Sequence[Extent]:
        """The extents written since the parent run (only for a disk read incrementally)."""
        plan = self.plan(disk)
        if plan.extents is not None:
            return plan.extents
        return source.dirty_extents()


@dataclass
class GroupPoint:
    domains: list[DomainPoint]
    freeze_ms: float = 0.0
    hooks: HookRun = field(default_factory=HookRun)  # the pre-freeze/post-thaw hooks, and their time
    started_at: float = field(default_factory=time.time)
    cleanup_errors: list[str] = field(default_factory=list)  # what ending the jobs or dropping old bases left undone


def _agent(dom: libvirt.virDomain, command: str, timeout: int = 10) -> Any:
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command}), timeout, 0)
    return json.loads(reply)["return"]


def tracked(disk: DiskInfo) -> bool:
    """Whether libvirt keeps a persistent dirty bitmap (a checkpoint) for the disk: checkpoints need qcow2."""
    return disk.format == "qcow2"


def _backup_xml(p: DomainPoint, scratch_dir: str) -> str:
    incremental = f"<incremental>{p.parent_checkpoint}</incremental>" if p.parent_checkpoint else ""
    parts = []
    for d in p.disks:
        # A disk not read from the checkpoint (raw, or its bitmap is gone) is exported whole.
        plan = p.plan(d)
        full = p.parent_checkpoint and not (plan.method == CHECKPOINT and plan.incremental)
        mode = " backupmode='full'" if full else ""
        scratch = _scratch_path(d, scratch_dir)
        parts.append(f"<disk name='{d.target}' backup='yes' type='file'{mode}><scratch file='{scratch}'/></disk>")
    parts += [f"<disk name='{d.target}' backup='no'/>" for d in p.excluded]
    return (f"<domainbackup mode='pull'>{incremental}<server transport='unix' socket='{p.socket}'/>"
            f"<disks>{''.join(parts)}</disks></domainbackup>")


def _checkpoint_xml(name: str, p: DomainPoint) -> str | None:
    """This run's libvirt checkpoint, or None when no disk of the job is tracked by one (all raw): a
    checkpoint of nothing would cost every run libvirt's schema check of it (~10 ms, it compiles the whole
    domain schema) and its metadata, made now and deleted by the next run."""
    if not any(tracked(d) for d in p.disks):
        return None
    disk_xml = _checkpoint_disks(p)
    return f"<domaincheckpoint><name>{name}</name><disks>{disk_xml}</disks></domaincheckpoint>"


def _checkpoint_disks(p: DomainPoint, bitmap: str = "") -> str:
    """A checkpoint's ``<disks>`` content: the qcow2 disks tracked (by ``bitmap`` if named, else by a bitmap
    libvirt makes under the checkpoint's name), raw and excluded disks not."""
    named = f" bitmap='{bitmap}'" if bitmap else ""
    return "".join(f"<disk name='{d.target}' checkpoint='bitmap'{named}/>" if tracked(d)
                   else f"<disk name='{d.target}' checkpoint='no'/>" for d in p.disks) \
        + "".join(f"<disk name='{d.target}' checkpoint='no'/>" for d in p.excluded)


def _has_checkpoint(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def _wait_job_end(dom: libvirt.virDomain, timeout: float = 60.0) -> bool:
    """Wait until an aborted pull job has ended: libvirt returns from abortJob before QEMU's jobs finish."""
    start = time.monotonic()
    while _has_job(dom) and not vm_gone(dom):
        waited = time.monotonic() - start
        if waited > timeout:
            return False
        # An aborted pull job usually ends 5-15 ms later: poll every millisecond until then (a lookup costs
        # ~0.3 ms; backing off from 2 ms found the end up to 8 ms late, and the run's end waits for it).
        time.sleep(0.001 if waited < 0.05 else 0.02)
    return True


def _has_job(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return True


def _plan_disks(p: DomainPoint) -> None:
    """Decide per disk: incremental from the parent's checkpoint or bitmap, or a full read and why."""
    parent = p.parent
    try:
        nodes: dict[str, dict[str, Any]] | None = top_nodes(p.domain, p.live_xml or None)
        qmp_error = ""
    except (QmpError, libvirt.libvirtError) as exc:
        nodes, qmp_error = None, str(exc)
    has_checkpoint = parent is not None and any(map(tracked, p.disks)) and p.has_checkpoint(parent)
    idle = p.idle
    for disk in p.disks:
        node = (nodes or {}).get(disk.target)
        bitmaps = node_bitmaps(node) if node else {}
        if tracked(disk):
            node_name = str(node["node-name"]) if node else None
            plan = p.plans[disk.target] = DiskPlan(CHECKPOINT, node=node_name,
                                                   size=int((node or {}).get("image", {}).get("virtual-size", 0)),
                                                   chain=image_chain(node) if node else None)
            plan.granularity = bitmap_granularity(plan.size)
            if idle:
                _drop_leftovers(p, plan, bitmaps)
            if parent is None:
                plan.note = f"full read; checkpoint {p.checkpoint} starts tracking"
            elif not has_checkpoint:
                plan.note = (f"full read: checkpoint {parent} missing "
                             "(domain redefined or migrated, or the checkpoint was deleted)")
            elif node is not None and "backing-image" not in node.get("image", {}) and parent not in bitmaps:
                plan.note = (f"full read: checkpoint {parent} exists but its bitmap is missing from "
                             f"{disk.path} (removed behind libvirt's back)")
            elif parent in bitmaps and bitmaps[parent].get("inconsistent"):
                plan.note = (f"full read: checkpoint {parent}'s bitmap in {disk.path} is inconsistent "
                             "(marked in-use: QEMU stopped without saving it)")
            else:
                plan.incremental = True
                plan.note = f"checkpoint {parent} dirty bitmap ({_checkpoint_granularity(bitmaps.get(parent))})"
            olds = {parent, *p.retire} - {None}
            plan.strays = sorted(name for name in bitmaps if name.startswith("raksha-") and (
                (name.endswith(LEGACY_FINE_SUFFIX) and name[:-len(LEGACY_FINE_SUFFIX)] in olds)
                or (name in olds and not p.has_checkpoint(name))))
            continue
        if node is None:
            why = qmp_error or "QEMU reports no block node for it"
            p.plans[disk.target] = DiskPlan(UNTRACKED, note=f"full read: no changed-block tracking ({why})")
            continue
        plan = p.plans[disk.target] = DiskPlan(QEMU_BITMAP, node=str(node["node-name"]),
                                               size=int(node.get("image", {}).get("virtual-size", 0)),
                                               chain=image_chain(node))
        plan.granularity = bitmap_granularity(plan.size)
        if idle:
            _drop_leftovers(p, plan, bitmaps)
        base = bitmaps.get(parent) if parent else None
        if parent is None:
            plan.note = f"full read; QEMU dirty bitmap {p.checkpoint} starts tracking"
        elif base is None:
            plan.note = (f"full read: QEMU dirty bitmap {parent} not found on {disk.path} (QEMU was restarted "
                         "or the VM migrated since that run; the bitmap is not persistent)")
        elif not recording(base):
            plan.note = f"full read: QEMU dirty bitmap {parent} on {disk.path} is not usable ({base})"
        else:
            plan.incremental = True
            plan.granularity = int(base.get("granularity", plan.granularity))
            plan.note = f"QEMU dirty bitmap {parent} ({plan.granularity // 1024} KiB granularity, non-persistent)"
    if any(p.plans[d.target].method == CHECKPOINT and p.plans[d.target].incremental for d in p.disks):
        p.parent_checkpoint = parent


def _checkpoint_granularity(bitmap: dict[str, Any] | None) -> str:
    granularity = int((bitmap or {}).get("granularity", 0))
    return f"{granularity // 1024} KiB granularity" if granularity else "granularity unknown"


def _drop_leftovers(p: DomainPoint, plan: DiskPlan, bitmaps: dict[str, dict[str, Any]]) -> None:
    """Only with no backup job on the domain: the bitmaps of a killed run (its ``~read`` copies) and this
    run's own bitmap if the run is being retried."""
    for name, info in bitmaps.items():
        if ((name == p.checkpoint != p.parent) or (name.startswith("raksha-") and name.endswith(READ_SUFFIX))) \
                and not info.get("busy"):
            try_qmp(p.domain, "block-dirty-bitmap-remove", node=plan.node, name=name)


def _add_bitmaps(p: DomainPoint) -> None:
    """This run's bitmaps, named as the run, added before ``backupBegin`` so no write after the point is
    missed: not persistent on raw disks; persistent (in the image) on qcow2 disks, where they become the
    run's checkpoint's (``_make_checkpoint_after``). All of a kind in one transaction: all or none."""
    raw = [plan for d in p.disks if (plan := p.plans[d.target]).method == QEMU_BITMAP]
    qcow2 = [p.plans[d.target] for d in p.disks if p.plans[d.target].method == CHECKPOINT]
    if any(plan.node is None for plan in qcow2):
        qcow2 = []  # libvirt makes the checkpoint's bitmaps, on every disk, under the run's name: none of Raksha's
    for plans, persistent in ((raw, False), (qcow2, True)):
        if not plans:
            continue
        actions = [{"type": "block-dirty-bitmap-add",
                    "data": {"node": plan.node, "name": p.checkpoint,
                             "granularity": plan.granularity, "persistent": persistent}} for plan in plans]
        try:
            qmp(p.domain, "transaction", actions=actions)
        except QmpError as exc:
            for plan in plans:
                if persistent:  # libvirt makes the checkpoint's bitmaps, at its own granularity
                    plan.note += f" (libvirt makes this run's bitmap, at the 64 KiB cluster's granularity: adding " \
                                 f"Raksha's failed: {exc})"
                else:
                    plan.method, plan.incremental = UNTRACKED, False
                    plan.note = f"full read: no changed-block tracking (adding QEMU dirty bitmap failed: {exc})"
            continue
        for plan in plans:
            plan.added = True


def _read_parent_bitmaps(p: DomainPoint) -> None:
    """After ``backupBegin``: copy each raw disk's parent bitmap, export the copy on the job's NBD server, read it.
    (A qcow2 disk's comes with its export: libvirt's job copies the parent checkpoint's.)

    The parent bitmap itself keeps recording, so a run that fails later leaves a correct base.
    """
    for disk in p.disks:
        plan = p.plans[disk.target]
        if plan.method != QEMU_BITMAP or not plan.incremental or p.parent is None or plan.node is None:
            continue
        try:
            plan.extents = read_bitmap(p.domain, p.socket, plan.node, p.parent, f"raksha-bitmap-{disk.target}",
                                       granularity=plan.granularity, release=p.later)
        except (QmpError, RakshaError) as exc:
            plan.extents = None
            plan.incremental = False
            plan.note = f"full read: reading QEMU dirty bitmap {p.parent} failed: {exc}"


def _settle(p: DomainPoint, ok: bool) -> list[str]:
    """Keep one base per disk: after a good run this run's (the parent's and the retired runs' go), after a
    failed one the parent's. Returns, after a good run, what should have gone and is still there: the
    backup stays good, but a leftover bitmap costs the guest's writes until someone removes it, so it is
    said ("<domain>[:<disk>]: ...")."""
    olds = ([p.parent] if p.parent else []) + [r for r in p.retire if r not in (p.parent, p.checkpoint)]
    removed = True  # every bitmap of the olds was there and is gone: nothing can be left to look for
    for disk in p.disks:
        plan = p.plans.get(disk.target)
        if plan is None or plan.node is None:
            continue
        if ok:  # a qcow2 disk's go with their checkpoints, below
            for name in plan.strays if plan.method == CHECKPOINT else olds:
                removed &= try_qmp(p.domain, "block-dirty-bitmap-remove", node=plan.node, name=name)
        elif plan.added and not (plan.method == CHECKPOINT and p.checkpoint_made):
            try_qmp(p.domain, "block-dirty-bitmap-remove", node=plan.node, name=p.checkpoint)
    # libvirt checkpoints: deleting one merges its bitmap into its parent checkpoint's, so either way is safe.
    for old in olds if ok else []:
        if _delete_checkpoint(p.domain, old, metadata_fallback=True):
            removed = False
            # libvirt could only forget it (its bitmap was missing or inconsistent): drop what is left of it.
            for plan in p.plans.values():
                if plan.method == CHECKPOINT and plan.node is not None:
                    try_qmp(p.domain, "block-dirty-bitmap-remove", node=plan.node, name=old)
    if not ok and p.checkpoint_made and not vm_gone(p.domain):
        # A VM that stopped keeps the failed run's checkpoint (and its bitmap, saved in the image): forgetting
        # only the metadata would leave an orphan bitmap; the next good run from the parent is right either way.
        _delete_checkpoint(p.domain, p.checkpoint, metadata_fallback=False)
    # Looked for only when a removal failed: a checkpoint that is not found, or is deleted, leaves nothing.
    return _leftovers(p, olds) if ok and olds and not removed else []


def _leftovers(p: DomainPoint, olds: list[str]) -> list[str]:
    """Checkpoints and bitmaps of ``olds`` still on the domain (judged by what is there, not by which call
    failed: removing a bitmap that never existed fails too, and is no problem)."""
    name = p.domain.name()
    out = [f"{name}: checkpoint {old} could not be deleted and stays on the domain "
           f"(virsh checkpoint-delete {name} {old})" for old in olds if _has_checkpoint(p.domain, old)]
    try:
        nodes = top_nodes(p.domain)
    except (QmpError, libvirt.libvirtError):
        return out  # the domain went away meanwhile: nothing of it is left to cost anything
    for disk in p.disks:
        plan = p.plans.get(disk.target)
        node = nodes.get(disk.target)
        if plan is None or node is None:
            continue
        stale = sorted(set(node_bitmaps(node)) & {*olds, *plan.strays})
        if stale:
            busy = [b for b in stale if node_bitmaps(node)[b].get("busy")]
            out.append(f"{name}:{disk.target}: dirty bitmap(s) {', '.join(stale)} could not be removed"
                       f"{' (in use by another job or export)' if busy else ''} and stay on the disk, costing "
                       f"its writes a little until removed (QMP block-dirty-bitmap-remove, node {plan.node})")
    return out


def _delete_checkpoint(dom: libvirt.virDomain, name: str, *, metadata_fallback: bool) -> bool:
    """Delete a checkpoint with its bitmaps; return True if only its metadata could be deleted."""
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        cp.delete(0)
        return False
    except libvirt.libvirtError:
        if not metadata_fallback:
            return False
        try:  # its bitmap is already gone (or broken): forget the metadata
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError:
            pass
        return True


def pull_dir() -> str:
    return os.environ.get(PULL_DIR_ENV) or DEFAULT_PULL_DIR


def qemu_owner(domain_xml: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as for a running domain: libvirt's DAC label in its live XML ("+64055:+64055",
    or names). None when libvirt does not say."""
    for label in ET.fromstring(domain_xml).findall("./seclabel[@model='dac']/label"):
        owner = parse_dac_label(label.text or "")
        if owner is not None:
            return owner
    return None


def make_workdir() -> str:
    """This run's work directory: QEMU may pass through it (0711) to its domain's own directory."""
    base = pull_dir()
    _sweep_workdirs(base)
    try:
        workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=base)
        os.chmod(workdir, 0o711)
    except OSError as exc:
        err = HypervisorError(f"cannot make the pull backup's work directory in {base} ({PULL_DIR_ENV}): {exc}",
                              code="PULL_DIR_UNUSABLE")
        err.retryable = False  # a missing or read-only directory stays so until someone fixes it
        raise err from exc
    return workdir


def domain_dir(workdir: str, uuid: str, owner: tuple[int, int] | None) -> str:
    """A domain's export socket and scratch images: a directory of QEMU's own (it creates the socket there),
    private to it and root."""
    path = os.path.join(workdir, uuid)
    os.mkdir(path, 0o700)
    if owner is not None and owner != (os.geteuid(), os.getegid()):
        try:
            os.chown(path, *owner)
        except OSError as exc:  # not root: QEMU must then run as this user
            log.warning("cannot give %s to QEMU's user %d:%d: %s", path, owner[0], owner[1], exc)
    return path


def _sweep_workdirs(base: str) -> None:
    """Remove work directories of Raksha processes that died (SIGKILL, a crash): their scratch images may
    hold gigabytes. Their jobs were ended by then or will be (``end_stale_job``); QEMU keeps a removed file
    it still has open."""
    remove_dirs_of_dead_owners(base, _SOCKET_OWNER)


def _scratch_path(disk: DiskInfo, scratch_dir: str) -> str:
    return os.path.join(scratch_dir, disk.target + ".scratch")


# Empty qcow2 scratch images by virtual size, as qemu-img made them (the same bytes every time). A later run
# of the process writes one in well under a millisecond where qemu-img takes ~7 ms, which a domain would
# wait for before its window.
_SCRATCH_TEMPLATES: dict[int, bytes] = {}
_SCRATCH_TEMPLATE_MAX = 4 << 20  # an empty image's metadata: ~200 KiB for 2 GiB, ~260 KiB for 1 TiB


def _start_scratch(p: DomainPoint, scratch_dir: str) -> list[subprocess.Popen[bytes] | None]:
    """Start making each disk's scratch image (empty qcow2 of the disk's size) before the freeze window:
    written at once from a template (None) or by qemu-img.

    Left to libvirt, ``backupBegin`` formats them itself with blockdev-create jobs inside the window:
    ~75 ms a domain against ~47 ms given them (REUSE_EXTERNAL; measured on a TCG guest). A disk of
    unknown size, or qemu-img failing, leaves it to libvirt as before."""
    sizes = [p.plan(d).size for d in p.disks]
    if not p.disks or not all(sizes):
        return []
    procs: list[subprocess.Popen[bytes] | None] = []
    try:
        for disk, size in zip(p.disks, sizes, strict=True):
            path = _scratch_path(disk, scratch_dir)
            template = _SCRATCH_TEMPLATES.get(size)
            if template is not None:
                with open(path, "xb") as f:
                    f.write(template)
                procs.append(None)
                continue
            procs.append(subprocess.Popen(
                ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    except OSError as exc:
        log.info("%s: scratch images left to libvirt: %s", p.domain.name(), exc)
        _finish_scratch(p, procs, scratch_dir)
        return []
    return procs


def _finish_scratch(p: DomainPoint, procs: list[subprocess.Popen[bytes] | None], scratch_dir: str) -> None:
    """Wait for ``_start_scratch``'s images; use them only if every one was made (else remove them)."""
    made = bool(procs) and len(procs) == len(p.disks)
    for disk, proc in zip(p.disks, procs, strict=False):
        if proc is None:
            continue
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = b"timed out"
        if proc.returncode != 0:
            log.info("%s: scratch image left to libvirt: qemu-img: %s", p.domain.name(),
                     err.decode(errors="replace").strip())
            made = False
        else:
            _keep_template(p.plan(disk).size, _scratch_path(disk, scratch_dir))
    try:
        for disk in p.disks if made else ():
            path = _scratch_path(disk, scratch_dir)
            os.chmod(path, 0o600)  # the guest's data is copied there before it is overwritten
            if p.qemu_owner is not None:
                os.chown(path, *p.qemu_owner)
    except OSError:
        made = False
    p.scratch_made = made
    if not made:
        _remove_scratch(p, scratch_dir)


def _keep_template(size: int, path: str) -> None:
    """Keep qemu-img's fresh image of ``size`` bytes as the template for the next ones (if small)."""
    if size in _SCRATCH_TEMPLATES:
        return
    try:
        if os.path.getsize(path) <= _SCRATCH_TEMPLATE_MAX:
            with open(path, "rb") as f:
                _SCRATCH_TEMPLATES[size] = f.read()
    except OSError:
        pass  # the next run asks qemu-img again


def _remove_scratch(p: DomainPoint, scratch_dir: str) -> None:
    """Leave the scratch images to libvirt, which refuses to make one that exists."""
    p.scratch_made = False
    for disk in p.disks:
        try:
            os.unlink(_scratch_path(disk, scratch_dir))
        except FileNotFoundError:
            pass


def _make_checkpoint(p: DomainPoint) -> None:
    """This run's libvirt checkpoint (none when no disk of the job is tracked by one). Where it cannot be
    made, the backup goes on and the next run reads the qcow2 disks whole; ``checkpoint_refused`` says why."""
    xml = _checkpoint_xml(p.checkpoint, p)
    if xml is None:
        return
    try:
        p.domain.checkpointCreateXML(xml, 0)
    except libvirt.libvirtError as exc:
        p.checkpoint_refused = (f"checkpoint {p.checkpoint} could not be made: {exc.get_error_message() or exc}; "
                                "the next run reads its qcow2 disks whole")
        return
    p.checkpoint_made = True


def _checkpoint_after(p: DomainPoint) -> bool:
    """Whether this run's checkpoint can be made after the window, beside the transfer: every disk it tracks
    has the run's bitmap, added before the point in time, for libvirt to take as the checkpoint's."""
    plans = [p.plan(d) for d in p.disks if tracked(d)]
    return bool(plans) and all(plan.added for plan in plans)


def _redefine_xml(p: DomainPoint) -> str:
    """This run's checkpoint over the bitmaps the run added (``_add_bitmaps``), named as it; after the
    parent's checkpoint when the domain has it (``virsh checkpoint-list --tree``)."""
    parent = f"<parent><name>{p.parent}</name></parent>" if p.parent and p.has_checkpoint(p.parent) else ""
    return (f"<domaincheckpoint><name>{p.checkpoint}</name>{parent}<creationTime>{int(time.time())}</creationTime>"
            f"<disks>{_checkpoint_disks(p, p.checkpoint)}</disks></domaincheckpoint>")


def _make_checkpoint_after(p: DomainPoint) -> None:
    """This run's checkpoint, made while the disks are read (``_checkpoint_after``, ADR 0028): libvirt takes
    the run's bitmaps as its own (a redefinition, checked against the images). Its schema check of the XML
    and its metadata (~20 ms) are then outside the run's critical path, and each disk keeps one bitmap, at
    4 KiB, which has marked every write since before the point in time. A checkpoint libvirt refuses takes
    the run's bitmaps with it: the next run reads whole."""
    try:
        p.domain.checkpointCreateXML(_redefine_xml(p), libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                                     | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
    except libvirt.libvirtError as exc:
        for plan in (p.plan(d) for d in p.disks if tracked(d)):
            if plan.node is not None:  # no checkpoint has them: they would only cost the guest's writes
                try_qmp(p.domain, "block-dirty-bitmap-remove", node=plan.node, name=p.checkpoint)
        p.checkpoint_refused = (f"checkpoint {p.checkpoint} could not be made: {exc.get_error_message() or exc}; "
                                "the next run reads its qcow2 disks whole")
        return
    p.checkpoint_made = True


def _begin_job(p: DomainPoint, scratch: str) -> None:
    if p.scratch_made:
        try:
            p.domain.backupBegin(_backup_xml(p, scratch), None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
            return
        except libvirt.libvirtError as exc:
            # Whatever it was, libvirt making the scratch images tells.
            log.info("%s: backup job with ready scratch images refused (%s); libvirt makes them",
                     p.domain.name(), exc.get_error_message())
            _remove_scratch(p, scratch)
    p.domain.backupBegin(_backup_xml(p, scratch), None, 0)


def _begin(p: DomainPoint, scratch: str) -> None:
    """Start the domain's pull job; if libvirt refuses the incremental, start a full one and say why."""
    try:
        _begin_job(p, scratch)
    except libvirt.libvirtError as exc:
        if p.parent_checkpoint is None:
            raise
        refused = f"full read: libvirt refused the incremental from checkpoint {p.parent_checkpoint}: " \
                  f"{exc.get_error_message()}"
        p.parent_checkpoint = None
        for d in p.disks:
            plan = p.plan(d)
            if plan.method == CHECKPOINT and plan.incremental:
                plan.incremental, plan.note = False, refused
        _begin_job(p, scratch)
    p.started = True


def _clear_attempt(p: DomainPoint) -> None:
    """Before this run's checkpoint is made: one of its name, left by a killed attempt at this same run, goes
    (deleting it merges its bitmaps into its parent's). Only with no backup job on the domain (``p.idle``)."""
    try:  # one call for this run's checkpoint and the parent's
        p.checkpoints = {cp.getName() for cp in p.domain.listAllCheckpoints(0)}
    except libvirt.libvirtError:
        p.checkpoints = None  # looked up one by one, as a driver without checkpoints answers
    if p.idle and p.checkpoint != p.parent and p.has_checkpoint(p.checkpoint):
        _delete_checkpoint(p.domain, p.checkpoint, metadata_fallback=True)
        if p.checkpoints is not None:
            p.checkpoints.discard(p.checkpoint)


def _prepare(points: list[DomainPoint]) -> list[DomainPoint]:
    """Plan each domain's disks and add this run's bitmaps; the domains that could be prepared. A domain
    whose checkpoint cannot wait for the window to pass (a tracked disk without the run's bitmap) has it
    made now, so that libvirt's bitmaps record from before the point in time."""
    for p in points:
        try:
            _clear_attempt(p)
            _plan_disks(p)
            _add_bitmaps(p)
        except libvirt.libvirtError as exc:
            p.error = translate(exc, f"{p.domain.name()}: preparing the backup")
    ready = [p for p in points if p.error is None]
    errors = each(_make_checkpoint, [p for p in ready if not _checkpoint_after(p)])
    if err := next((e for e in errors if e is not None), None):
        raise err
    return ready


@contextmanager
def consistency_group(domains: list[tuple[libvirt.virDomain, str | None]], checkpoint: str,
                      *, freeze: bool = True, exclude: dict[str, set[str]] | None = None,
                      hooks: Hooks | None = None, retire: list[str] | None = None) -> Iterator[GroupPoint]:
    """Take one point in time over ``domains``, each with the parent run's checkpoint/bitmap name (or None).

    ``checkpoint`` names this run's libvirt checkpoint and raw-disk bitmaps. ``exclude`` maps a
    domain name to disk targets left out (and recorded). Yields while every domain's pull job is
    open; ends them all on exit. A domain whose job could not start has ``error`` set and no
    exports; the others go on. ``DomainPoint.fail()`` marks a domain the caller could not back up.
    ``hooks``: the guest scripts run before the freeze and after the thaw (strategy.Hooks; None: none);
    a frozen guest whose pre-freeze hook exited 0 reaches ``application``. ``retire``: checkpoint/bitmap
    names of the job's older runs that are no base any more (a full run's predecessor, runs killed
    mid-way), dropped from each domain after its good run, as the parent's are.
    """
    # No backup job left on a domain (none, or a dead run's ended now): its leftovers can go (``idle``).
    idle = [_end_stale_job(dom) is not _Job.KEPT for dom, _parent in domains]
    workdir = make_workdir()
    points = []
    try:
        for (dom, parent), no_job in zip(domains, idle, strict=True):
            skip = (exclude or {}).get(dom.name(), set())
            xml = dom.XMLDesc(0)
            disks = domain_disks(xml)
            owner = qemu_owner(xml)
            own_dir = domain_dir(workdir, dom.UUIDString(), owner)
            points.append(DomainPoint(dom, [d for d in disks if d.target not in skip],
                                      os.path.join(own_dir, "nbd.sock"), checkpoint, None,
                                      excluded=[d for d in disks if d.target in skip], parent=parent,
                                      retire=list(retire or ()), qemu_owner=owner, idle=no_job,
                                      inactive_xml=dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE
                                                               | libvirt.VIR_DOMAIN_XML_INACTIVE),
                                      live_xml=xml))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    group = GroupPoint(points)
    ok = False
    making: list[list[subprocess.Popen[bytes] | None]] = []
    try:
        # Before the window, so that their time is not the guests' freeze, and side by side: the pre-freeze
        # hooks (or the probes for them) in the guests, and the planning and the run's bitmaps (the run's
        # checkpoints come beside the reads, ADR 0025). A domain whose planning fails has its hook undone
        # after the window.
        hook_run = spawn(functools.partial(pre_freeze, points, hooks), name="raksha-pre-freeze") if freeze else None
        try:
            live = _prepare(points)
            scratch_dirs = {id(p): os.path.dirname(p.socket) for p in live}
            making.extend(_start_scratch(p, scratch_dirs[id(p)]) for p in live)
        except BaseException:
            if hook_run is not None:
                post_thaw(hook_run.result(), hooks)
            raise
        if hook_run is not None:
            group.hooks = hook_run.result()
        for p, procs in zip(live, making, strict=True):
            _finish_scratch(p, procs, scratch_dirs[id(p)])
        # The window: every guest frozen at once, every domain's job started at once, every guest thawed at once.
        t0 = time.monotonic()
        try:
            frozen = freeze_guests(group.hooks.to_freeze(live)) if freeze else []
            try:
                started = each(lambda p: _begin(p, scratch_dirs[id(p)]), live)
            finally:
                thawed = thaw_guests(frozen)
                # The window is the time a guest was frozen: none frozen (crash wanted, no agent), no window.
                group.freeze_ms = (time.monotonic() - t0) * 1000 if frozen else 0.0
        finally:
            post_thaw(group.hooks, hooks)  # after the thaw, whatever happened: what the pre-freeze hook did is undone
        thawed_ids = {id(t) for t in thawed}  # a guest whose thaw failed is not claimed filesystem-consistent
        for p in live:
            if id(p) in thawed_ids:
                p.consistency = group.hooks.reached(p, FILESYSTEM if p.started else CRASH)
        for p, err in zip(live, started, strict=True):
            if isinstance(err, libvirt.libvirtError):
                p.error = translate(err, f"{p.domain.name()}: the backup job did not start")
            elif err is not None:
                raise err
        # Each domain's in its own thread: a group of N domains waits for one domain's QMP calls, not N.
        errors = each(_read_parent_bitmaps, [p for p in points if p.started])
        if err := next((e for e in errors if e is not None), None):
            raise err
        for p in points:  # after the parent bitmaps' QMP calls, which would wait for its job
            if p.started and not p.checkpoint_made and _checkpoint_after(p):
                p.later(functools.partial(_make_checkpoint_after, p))
        yield group
        ok = True
    except libvirt.libvirtError as exc:
        raise translate(exc, "pull backup failed") from exc
    finally:
        for p in points:  # every job not ended yet is aborted at once, then each waited for
            p.end_job_soon()
        for p in points:
            group.cleanup_errors.extend(p.end_job())
            good = ok and p.started and p.error is None
            if good and p.checkpoint_refused:
                group.cleanup_errors.append(f"{p.domain.name()}: {p.checkpoint_refused}")
            try:
                group.cleanup_errors.extend(_settle(p, good))
            except libvirt.libvirtError as exc:
                if not vm_gone(p.domain):
                    group.cleanup_errors.append(f"{p.domain.name()}: dropping old checkpoints and bitmaps failed: "
                                            f"{exc.get_error_message()}")
        for msg in group.cleanup_errors:
            log.warning("%s", msg)
        for proc in (proc for procs in making for proc in procs if proc is not None and proc.poll() is None):
            proc.kill()  # only when the run failed before the window
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
