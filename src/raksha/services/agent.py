"""The agent on a hypervisor host: finds VMs, takes a run's consistent backup, restores.

It knows libvirt and the vault, nothing of the database: the orchestrator tells it what to
do and records what it reports. Progress and cancellation come through plain callables, which
the in-process transport passes as they are (a remote transport turns them into casts back).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import libvirt

from raksha.domain.errors import Interrupted, NotFound
from raksha.hypervisor.errors import translate
from raksha.hypervisor.group_backup import GroupResult, backup_domains
from raksha.hypervisor.pull import end_stale_job
from raksha.hypervisor.restore import RestoreReport, RestoreRequest, restore
from raksha.hypervisor.strategy import Hooks
from raksha.vault.engine.progress import ProgressEvent
from raksha.vault.repository import Vault

#: (vm name, disk target, event) while disks are read.
ProgressHook = Callable[[str, str, ProgressEvent], None]


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; they are raised and translated instead."""


libvirt.registerErrorHandler(_quiet, None)


class LibvirtAgent:
    def __init__(self, uri: str, *, strategy: str = "pull", hooks: Hooks | None = None) -> None:
        self.uri = uri
        self.strategy = strategy
        self.hooks = hooks  # the guests' application hooks (None: the defaults, strategy.Hooks())
        self._local = threading.local()

    def _conn(self) -> libvirt.virConnect:
        # One connection per worker thread: libvirt connections may be shared, but a broken one
        # then fails every run; per thread it is reopened on the next use.
        conn = getattr(self._local, "conn", None)
        if conn is None or not conn.isAlive():
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise translate(exc, f"cannot connect to libvirt at {self.uri}") from None
            self._local.conn = conn
        return conn

    def describe_vm(self, ref: str) -> dict[str, str]:
        """A VM by libvirt domain name or UUID: ``{"uuid", "name"}``, or ``VM_NOT_FOUND``."""
        conn = self._conn()
        for lookup in (conn.lookupByUUIDString, conn.lookupByName):
            try:
                dom = lookup(ref)
            except libvirt.libvirtError:
                continue
            return {"uuid": dom.UUIDString(), "name": dom.name()}
        raise NotFound(f"no VM {ref!r} on {self.uri} (a libvirt domain name or UUID)", code="VM_NOT_FOUND", vm=ref)

    def end_stale_jobs(self, refs: list[str]) -> list[str]:
        """After a restart: end the pull jobs a dead Raksha process left open on these VMs and thaw their guests
        (a job of a live process, or of another tool, is left alone). Returns the VMs that had one."""
        ended = []
        conn = self._conn()
        for ref in refs:
            for lookup in (conn.lookupByUUIDString, conn.lookupByName):
                try:
                    dom = lookup(ref)
                except libvirt.libvirtError:
                    continue
                if end_stale_job(dom):
                    ended.append(dom.name())
                break
        return ended

    def discard_domains_under(self, names: list[str], directory: str) -> list[str]:
        """Undefine (and stop) the domains of ``names`` whose disks all lie in ``directory``: what an interrupted
        new-VM restore defined there. Any other domain of such a name is left alone. Returns those removed."""
        removed = []
        conn = self._conn()
        prefix = os.path.join(os.path.realpath(directory), "")
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            sources = re.findall(r"<source file='([^']*)'", dom.XMLDesc(0))
            if not sources or not all(os.path.realpath(src).startswith(prefix) for src in sources):
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
                removed.append(name)
            except libvirt.libvirtError:
                pass
        return removed

    def discard_restored(self, restore_type: str, restored: list[dict[str, Any]]) -> None:
        """Undo what a cancelled restore finished before the cancel (VMs restored whole: new domains and their
        disks, or image files); an in-place restore cannot be undone and is left as it is."""
        if restore_type == "in_place":
            return
        for vm in restored:
            if restore_type == "new_vm" and (vm.get("uuid") or vm.get("domain")):
                conn = self._conn()
                try:
                    dom = (conn.lookupByUUIDString(vm["uuid"]) if vm.get("uuid")
                           else conn.lookupByName(vm["domain"]))
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                except libvirt.libvirtError:
                    pass  # already gone
            for path in [d.get("path") for d in vm.get("disks", [])] + list(vm.get("files", [])):
                if path:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass

    def backup(self, vault: Vault, job: str, run: str, names: list[str], *, parent_run: str | None,
               exclude: dict[str, set[str]], progress: ProgressHook, cancelled: Callable[[], bool],
               consistency: str | None = None, retire_runs: Sequence[str] = ()) -> GroupResult:
        """``consistency``: the level the job wants (None: the best each VM reaches; see ``backup_domains``).
        ``retire_runs``: older runs of the job whose changed-block tracking the run retires."""
        def hook(vm: str, disk: str, event: ProgressEvent) -> None:
            if cancelled():
                raise Interrupted(f"run {run} was cancelled", code="CANCELLED")
            progress(vm, disk, event)

        return backup_domains(self._conn(), names, vault, job, run, parent_run=parent_run, exclude=exclude,
                              progress=hook, strategy=self.strategy, consistency=consistency,
                              hooks=self.hooks, retire_runs=retire_runs)

    def restore(self, vault: Vault, request: RestoreRequest, *, progress: Callable[[ProgressEvent], None],
                cancelled: Callable[[], bool]) -> RestoreReport:
        def hook(event: ProgressEvent) -> None:
            if cancelled():
                raise Interrupted("the restore was cancelled", code="CANCELLED")
            progress(event)

        conn = None if request.type == "files" else self._conn()
        return restore(conn, vault, request, progress=hook)
