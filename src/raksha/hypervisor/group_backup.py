"""Back up several running domains as one point in time into the vault.

The run is named ``<job>/<run>``; each disk lands at ``<job>/<run>/<vm uuid>/<target>``.
An incremental reads each disk's changes since the parent run: a qcow2 disk's
from the libvirt checkpoint the parent run left, a raw disk's (file or block
device) from the QEMU dirty bitmap the parent run added (``pull``). A disk whose
base is gone (undefined, migrated, QEMU restarted, a bitmap lost or
inconsistent) is read in full and its ``tracking`` says why. After a good run
only its own checkpoint and bitmaps are kept, so bitmaps never pile up.
With ``strategy="snapshot"`` (hosts without checkpoints, snapshot.py) every
disk's changes are the clusters of the overlay the parent run left on it.

A VM that fails during the run (destroyed mid-read, its job refused) is
reported on that VM with a stable error code (``VmResult.error``); the other
VMs of the group complete, and the failed VM keeps its previous base.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import libvirt

from raksha.domain.errors import InvalidInput, NotFound, RakshaError, VmGone
from raksha.hypervisor.disks import domain_interfaces
from raksha.hypervisor.errors import translate, vm_gone
from raksha.hypervisor.pull import consistency_group
from raksha.hypervisor.snapshot import snapshot_group
from raksha.hypervisor.strategy import LEVELS, STRATEGIES, DomainPoint, GroupPoint, HookRun, Hooks
from raksha.vault.engine.backup import Preread, backup_disk, preread
from raksha.vault.engine.progress import ProgressEvent
from raksha.vault.engine.workers import run_parallel
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import Lock, LockKind
from raksha.vault.repository import Vault
from raksha.vault.sources.nbd import NbdSource
from raksha.vault.threads import spawn


@dataclass
class DiskResult:
    target: str
    backup_id: str
    kind: str  # full | incremental
    tracking: str  # how its changes were found
    bytes_read: int
    bytes_stored: int
    method: str = ""  # libvirt-checkpoint | qemu-dirty-bitmap | none
    seconds: float = 0.0  # in the vault engine (reading, encoding, storing); the rest of a run is the hypervisor's


@dataclass
class VmResult:
    name: str
    uuid: str
    consistency: str
    why: str = ""
    disks: list[DiskResult] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # disk targets left out on purpose (temp space)
    error: dict[str, Any] | None = None  # this VM failed: {code, message, retryable}; the others went on
    warnings: list[str] = field(default_factory=list)  # after its backup: what was left for the next run


@dataclass
class GroupResult:
    job: str
    run: str
    freeze_ms: float
    vms: list[VmResult]
    pre_freeze_ms: float = 0.0  # the guests' pre-freeze hooks, all at once, before the window
    post_thaw_ms: float = 0.0  # their post-thaw hooks, after it


def default_parallel_vms() -> int:
    """VMs transferred at once: one per core, at least two (each has its own worker threads)."""
    return max(2, os.cpu_count() or 1)


def checkpoint_name(job: str, run: str) -> str:
    return f"raksha-{job}-{run}"


ProgressHook = Callable[[str, str, ProgressEvent], None]  # (vm name, disk target, event)


def backup_domains(conn: libvirt.virConnect, names: list[str], vault: Vault, job: str, run: str,
                   *, parent_run: str | None = None, threads: int | None = None,
                   exclude: dict[str, set[str]] | None = None,
                   progress: ProgressHook | None = None, strategy: str = "pull",
                   snapshot_options: dict[str, Any] | None = None, consistency: str | None = None,
                   hooks: Hooks | None = None, retire_runs: Sequence[str] = (),
                   parallel_vms: int | None = None) -> GroupResult:
    """``strategy`` "pull" (checkpoints, pull.py) or "snapshot" (external snapshots for hosts without
    checkpoint support, snapshot.py; ``snapshot_options`` go to ``snapshot_group``).

    ``consistency`` is the level wanted (None: the best each VM can reach): ``application`` runs the
    guests' hooks around the freeze (``hooks``: their paths and timeout, default ``Hooks()``),
    ``filesystem`` only freezes, ``crash`` does not freeze. Each VM records the level it reached and why.

    ``retire_runs``: the job's older runs whose changed-block tracking is no base any more (a full run's
    predecessor, runs killed mid-way): their checkpoints and bitmaps are dropped from each VM once this
    run succeeds on it (pull strategy), as the parent run's are.

    ``parallel_vms``: how many VMs' disks are transferred at once after the point in time is taken
    (default :func:`default_parallel_vms`); each VM's disks go one after another."""
    if strategy not in STRATEGIES:
        raise InvalidInput(f"unknown backup strategy {strategy!r}: one of {', '.join(STRATEGIES)}",
                           code="INVALID_STRATEGY")
    if consistency is not None and consistency not in LEVELS:
        raise InvalidInput(f"unknown consistency level {consistency!r}: one of {', '.join(LEVELS)}",
                           code="INVALID_CONSISTENCY")
    freeze = consistency != "crash"
    run_hooks = Hooks.for_level(consistency, hooks)
    wanted_note = {"crash": "crash consistency wanted: not frozen. ",
                   "filesystem": "filesystem consistency wanted: no guest hooks run. "}.get(consistency or "", "")
    doms = []
    for name in names:
        try:
            doms.append(conn.lookupByName(name))
        except libvirt.libvirtError:
            raise NotFound(f"no domain {name!r} on {conn.getURI()}", code="VM_NOT_FOUND") from None
    parent_cp = checkpoint_name(job, parent_run) if parent_run else None
    # Each domain's disks are tracked from the parent run's checkpoint (qcow2) or QEMU bitmap (raw);
    # the group decides per disk whether that base is usable (pull.py) and keeps only the newest one.
    group: AbstractContextManager[GroupPoint] = (
        snapshot_group(doms, job, run, parent_run, exclude=exclude, freeze=freeze, hooks=run_hooks,
                       **(snapshot_options or {}))
        if strategy == "snapshot" else
        consistency_group([(dom, parent_cp) for dom in doms], checkpoint_name(job, run), exclude=exclude,
                          freeze=freeze, hooks=run_hooks,
                          retire=[checkpoint_name(job, r) for r in retire_runs]))
    # One shared vault lock for the run's disks, and under it what the backups read of the vault before their
    # disks (ADR 0026), beside the point in time: on a remote vault that is a few round trips, and after the
    # thaw every disk's transfer would wait for them.
    parents = [f"{job}/{parent_run}/{dom.UUIDString()}/" for dom in doms] if parent_run else []
    locking = spawn(functools.partial(_lock_and_read_ahead, vault, f"backup run {job}/{run}", parents),
                    name="raksha-vault-lock")
    try:
        with group as point:
            lock, ahead = locking.result()
            results, freeze_ms, hook_run = _transfer(vault, point, job, run, parent_run, threads, progress,
                                                     parallel_vms, wanted_note, lock, ahead)
    finally:
        _release(locking)
    # Clean-up after the backups (the snapshot strategy's block commits) ran as the group closed: a failure
    # there keeps the backup good and is said on its VM ("<domain>:<disk>: ...").
    for msg in point.cleanup_errors:
        for vm in results:
            if msg.startswith(f"{vm.name}:"):
                vm.warnings.append(msg)
    return GroupResult(job, run, freeze_ms, results, hook_run.pre_freeze_ms, hook_run.post_thaw_ms)


def _lock_and_read_ahead(vault: Vault, purpose: str, parent_prefixes: list[str]) -> tuple[Lock, Preread | None]:
    """The run's shared lock, then the stored ids and the parent run's manifests under ``parent_prefixes``."""
    lock = vault.locks.acquire(LockKind.SHARED, purpose)
    try:
        parents = {bid: info.size for prefix in parent_prefixes
                   for bid, info in sorted(vault.backup_objects(prefix).items())}
        return lock, preread(vault, parents, lock)
    except RakshaError:
        return lock, None  # each backup reads what it needs itself, and says what is wrong
    except BaseException:
        lock.release()
        raise


def _release(locking: Future[tuple[Lock, Preread | None]]) -> None:
    """Release the run's lock once it is taken (the run may have failed before it was waited for)."""
    try:
        lock, ahead = locking.result()
    except RakshaError:
        return  # never taken: the run already failed for it, or failed before and says why
    if ahead is not None:
        ahead.close()
    lock.release()


def _transfer(vault: Vault, point: GroupPoint, job: str, run: str, parent_run: str | None, threads: int | None,
              progress: ProgressHook | None, parallel_vms: int | None, wanted_note: str,
              lock: Lock, ahead: Preread | None) -> tuple[list[VmResult], float, HookRun]:
    """Every VM's disks into the vault, the VMs side by side; per VM its result."""
    results = []
    for p in point.domains:
        vm = VmResult(p.domain.name(), p.domain.UUIDString(), p.consistency, wanted_note + p.why)
        vm.excluded = [d.target for d in p.excluded]
        results.append(vm)

    def transfer(item: tuple[DomainPoint, VmResult]) -> None:
        p, vm = item
        try:
            _backup_vm(vault, p, vm, job, run, parent_run, point.freeze_ms, threads, progress, lock, ahead)
        except (RakshaError, libvirt.libvirtError) as exc:
            p.fail(_vm_error(p.domain, vm.name, exc))

    # The VMs' transfers run side by side (each disk's own pipeline is parallel too): small
    # incrementals wait on the disks and on QEMU more than they compute.
    live = [(p, vm) for p, vm in zip(point.domains, results, strict=True) if p.error is None]
    run_parallel(live, transfer, max(1, min(len(live), parallel_vms or default_parallel_vms())))
    for p, vm in zip(point.domains, results, strict=True):
        if p.error is not None:
            vm.error = p.error.to_dict()
    return results, point.freeze_ms, point.hooks


def _vm_error(dom: libvirt.virDomain, name: str, exc: Exception) -> RakshaError:
    """What a VM's failure is reported as: ``VM_GONE`` when it stopped under the run, else the error itself."""
    if vm_gone(dom):
        text = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        return VmGone(f"{name}: the VM stopped or vanished during the backup (destroyed or crashed): {text}")
    if isinstance(exc, libvirt.libvirtError):
        return translate(exc, f"{name}: backup failed")
    assert isinstance(exc, RakshaError)
    return exc


def _last_read(source: NbdSource, p: DomainPoint) -> Callable[[], None]:
    """After the domain's last disk is read: the job starts ending (while the vault commits), then the export
    is let go of (ending the job closes the NBD server: the disconnect is only courtesy)."""
    def done() -> None:
        p.reads_done()
        source.close()

    return done


def _backup_vm(vault: Vault, p: DomainPoint, vm: VmResult, job: str, run: str, parent_run: str | None,
               freeze_ms: float, threads: int | None, progress: ProgressHook | None, lock: Lock,
               ahead: Preread | None) -> None:
    # Enough to recreate the VM: its definition and its network mappings (seed: "network mappings").
    xml = p.definition()
    described = {"domain_xml": xml, "interfaces": json.dumps(domain_interfaces(xml))}
    for n, disk in enumerate(p.disks, 1):
        bid = BackupId(job, run, vm.uuid, disk.target)
        parent = BackupId(job, parent_run, vm.uuid, disk.target) if parent_run else None
        plan = p.plan(disk)
        tracking = plan.note
        incremental = plan.incremental and parent is not None and (
            (ahead is not None and ahead.has(parent)) or vault.has_backup(parent))
        if plan.incremental and not incremental:
            tracking = f"full read: parent backup {parent} not in the vault"
        source = p.source(disk)
        try:
            hook = (lambda ev, t=disk.target: progress(vm.name, t, ev)) if progress else None
            result = backup_disk(
                vault, source, bid,
                parent=parent if incremental else None,
                changed_extents=p.changed_extents(disk, source) if incremental else None,
                threads=threads, progress=hook,
                hints={"vm_name": vm.name, "consistency": p.consistency, "consistency_note": p.why,
                       "freeze_ms": f"{freeze_ms:.0f}", "tracking": tracking, "tracking_method": plan.method,
                       "disk_path": disk.path, "disk_format": disk.format, "bus": disk.bus,
                       "backing_chain": json.dumps(p.backing_chain(disk)), **described},
                reads_done=_last_read(source, p) if n == len(p.disks) else None,
                lock=lock, read_ahead=ahead,
            )
        finally:
            source.close()
        vm.disks.append(DiskResult(disk.target, str(bid), result.kind, tracking,
                                   result.stats.bytes_read, result.stats.bytes_stored, plan.method,
                                   result.stats.seconds))
