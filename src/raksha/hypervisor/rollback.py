"""Restore a disk in place by writing only the chunks that differ from the backup point (a quick rollback).

A qcow2 disk backed up with libvirt checkpoints keeps, in its image, a persistent dirty bitmap per
checkpoint (4 KiB, ADR 0028; beside a checkpoint an older Raksha made, a 4 KiB ``~fine`` one, used when
present). With the domain shut off, the disk holds what the backup taken with checkpoint C (point K)
held, except where C's bitmap is set. To bring it to point R, only two sets of chunks need writing:

- those the bitmap touches (written since K, by the guest or by an earlier restore), and
- those whose content differs between R and K (their manifests compared chunk by chunk: ids and layers).

Everything else already holds R's data. The chunks are written through a writable qemu-nbd, so QEMU marks
them in every enabled bitmap of the image: the checkpoints stay true (the next backup, incremental to K,
reads what this restore wrote) and a restore that is interrupted is finished by running it again.

A qcow2 disk is rolled back this way only when all of this holds; otherwise it is rewritten whole, as
before: no overlays; a checkpoint of this job whose bitmap is in the image, enabled and consistent (not
left ``in-use`` by a QEMU that died); K's backup of the disk still in the vault with R's chunk size and
disk size.

A raw disk (file or block device) is tracked by a QEMU bitmap in the running QEMU's memory, named after
the job's last run; it does not outlive the shut-off. So it is read before: the domain is paused (no
more guest writes), each raw disk's bitmap is read over a private NBD server of that QEMU, and only then
is the domain shut off. The chunks are then written straight into the file or device. The next backup of
a raw disk reads it in full, as after any QEMU restart. A domain that is not running has no such bitmap:
its raw disks are rewritten whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from raksha.domain.errors import NotFound, RakshaError
from raksha.hypervisor.pull import LEGACY_FINE_SUFFIX, domain_dir, make_workdir, qemu_owner
from raksha.hypervisor.qemu_blocks import READ_SUFFIX, QmpError, node_bitmaps, qmp, read_bitmap, recording, top_nodes
from raksha.vault.engine.changes import Ranges, chunks_to_roll_back
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.base import ExtentArray, InPlaceTarget
from raksha.vault.sources.nbd import NbdInPlace
from raksha.vault.sources.raw import RawTarget

log = logging.getLogger(__name__)

@dataclass
class Rollback:
    """How one disk is brought back to a point: the chunks to write, and why only those."""

    checkpoint: str
    bitmap: str
    since: BackupId  # the backup taken with the checkpoint: the disk equals it outside the bitmap
    dirty_bytes: int  # what the bitmap marks
    chunks: list[int]  # sorted
    parts: Ranges  # of the chunks that do not differ from ``since``: the ranges the bitmap marks
    target: InPlaceTarget  # the disk, open for writing; the caller closes it

    def bytes_to_write(self, point: Manifest) -> int:
        return sum(sum(end - start for start, end in self.parts[i]) if i in self.parts else point.chunk_length(i)
                   for i in self.chunks)

    def describe(self) -> str:
        return (f"{len(self.chunks) - len(self.parts)} chunk(s) that differ from {self.since.run} written in "
                f"place, and in {len(self.parts)} other(s) what bitmap {self.bitmap} marks ({self.dirty_bytes} "
                "bytes written since)")


def image_bitmaps(path: str) -> dict[str, dict[str, Any]]:
    """The persistent bitmaps stored in a qcow2 image, by name (``qemu-img info``; empty if it fails)."""
    res = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    data = (json.loads(res.stdout).get("format-specific") or {}).get("data") or {}
    return {b["name"]: b for b in data.get("bitmaps", []) if "name" in b}


def _usable(bitmap: dict[str, Any] | None) -> bool:
    """Enabled (it recorded every write since its checkpoint) and consistent (saved by a QEMU that exited)."""
    flags = (bitmap or {}).get("flags", [])
    return bitmap is not None and "auto" in flags and "in-use" not in flags


def _checkpoints(dom: libvirt.virDomain, job: str) -> list[tuple[str, str]]:
    """(checkpoint, run) of this job's checkpoints on the domain, the newest first."""
    prefix = f"raksha-{job}-"
    found = []
    for cp in dom.listAllCheckpoints():
        name = cp.getName()
        if not name.startswith(prefix):
            continue
        created = ET.fromstring(cp.getXMLDesc()).findtext("creationTime") or "0"
        found.append((int(created), name, name[len(prefix):]))
    return [(name, run) for _, name, run in sorted(found, reverse=True)]


def plan_rollback(vault: Vault, dom: libvirt.virDomain, job: str, disk: BackupId, point: Manifest,
                  path: str) -> Rollback | str:
    """How to bring the qcow2 image ``path`` of the shut-off domain ``dom`` back to ``point`` (backup
    ``disk``) by writing only what differs; or why it cannot be done (the disk is then rewritten whole)."""
    try:
        checkpoints = _checkpoints(dom, job)
    except libvirt.libvirtError as exc:
        return f"its checkpoints cannot be listed: {exc.get_error_message()}"
    if not checkpoints:
        return f"the domain has no checkpoint of job {job}"
    bitmaps = image_bitmaps(path)
    why = []
    for checkpoint, run in checkpoints:
        bitmap = next((b for b in (checkpoint + LEGACY_FINE_SUFFIX, checkpoint) if _usable(bitmaps.get(b))), None)
        if bitmap is None:
            why.append(f"{checkpoint}: no enabled, consistent bitmap in {path}")
            continue
        since = BackupId(job, run, disk.vm, disk.resource)
        base = _base(vault, since, point)
        if isinstance(base, str):
            why.append(f"{checkpoint}: {base}")
            continue
        try:
            target = NbdInPlace(path, "qcow2", bitmap=bitmap)
        except RakshaError as exc:
            why.append(f"{checkpoint}: {exc}")
            continue
        try:
            dirty = target.dirty_extents()
            chunks, parts = chunks_to_roll_back(point, base, dirty)
        except BaseException:
            target.close()
            raise
        return Rollback(checkpoint, bitmap, since, sum(n for _, n in dirty), chunks, parts, target)
    return "; ".join(why)



RawBitmaps = dict[str, dict[str, ExtentArray] | str]  # disk target -> {run: dirty extents}, or why none


def read_raw_bitmaps(dom: libvirt.virDomain, job: str, targets: list[str]) -> RawBitmaps:
    """Pause the running domain ``dom`` and read, for each raw disk in ``targets``, its QEMU bitmaps of
    ``job`` (one per run that still tracks it, named ``raksha-<job>-<run>``) over a private NBD server of
    its QEMU. The domain is left paused: the caller shuts it off, so no write escapes the bitmaps read."""
    if not targets:
        return {}
    try:
        if not dom.isActive():
            return {t: "the domain was not running: its QEMU dirty bitmap was gone" for t in targets}
        dom.suspend()
        nodes = top_nodes(dom)
    except (libvirt.libvirtError, QmpError) as exc:
        return {t: f"its QEMU dirty bitmap cannot be read: {exc}" for t in targets}
    prefix = f"raksha-{job}-"
    out: RawBitmaps = {}
    workdir = make_workdir()
    socket = os.path.join(domain_dir(workdir, dom.UUIDString(), qemu_owner(dom.XMLDesc(0))), "rollback.sock")
    try:
        qmp(dom, "nbd-server-start", addr={"type": "unix", "data": {"path": socket}})
    except QmpError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        return {t: f"its QEMU dirty bitmap cannot be read: nbd-server-start: {exc}" for t in targets}
    try:
        for target in targets:
            node = nodes.get(target)
            if node is None:
                out[target] = "QEMU reports no block node for it"
                continue
            found = {name: b for name, b in node_bitmaps(node).items()
                     if name.startswith(prefix) and not name.endswith(READ_SUFFIX) and recording(b)}
            if not found:
                out[target] = f"QEMU holds no usable dirty bitmap of job {job} for it"
                continue
            runs: dict[str, ExtentArray] = {}
            for k, name in enumerate(sorted(found)):
                try:
                    runs[name[len(prefix):]] = read_bitmap(dom, socket, str(node["node-name"]), name,
                                                           f"raksha-rollback-{target}-{k}")
                except (QmpError, RakshaError) as exc:
                    log.info("%s: %s: bitmap %s not read: %s", dom.name(), target, name, exc)
            out[target] = runs or "its QEMU dirty bitmaps could not be read"
    finally:
        try:
            qmp(dom, "nbd-server-stop")
        except QmpError:
            pass  # the domain is shut off next anyway
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _base(vault: Vault, since: BackupId, point: Manifest) -> Manifest | str:
    """The manifest of ``since``, the backup a bitmap started with, if ``point`` can be compared with it."""
    try:
        base = vault.read_manifest(since)
    except NotFound:
        return f"backup {since} is not in the vault"
    if (base.chunk_size, base.virtual_size) != (point.chunk_size, point.virtual_size):
        return f"backup {since} has another chunk or disk size"
    return base


def plan_raw_rollback(vault: Vault, job: str, disk: BackupId, point: Manifest, path: str,
                      bitmaps: dict[str, ExtentArray] | str | None) -> Rollback | str:
    """How to bring the raw file or device ``path`` back to ``point`` by writing only what differs, from
    the bitmaps ``read_raw_bitmaps`` read before the shut-off; or why it cannot be done."""
    if bitmaps is None:
        return "its QEMU dirty bitmap was not read"
    if isinstance(bitmaps, str):
        return bitmaps
    why = []
    for run, dirty in sorted(bitmaps.items(), key=lambda item: sum(n for _, n in item[1])):
        since = BackupId(job, run, disk.vm, disk.resource)
        base = _base(vault, since, point)
        if isinstance(base, str):
            why.append(f"bitmap of run {run}: {base}")
            continue
        chunks, parts = chunks_to_roll_back(point, base, dirty)
        target = RawTarget(path, point.virtual_size, fresh=False)
        return Rollback(f"raksha-{job}-{run}", f"raksha-{job}-{run} (QEMU)", since, sum(n for _, n in dirty), chunks,
                        parts, target)
    return "; ".join(why) or "no bitmap to use"
