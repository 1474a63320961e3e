"""Restore a disk in place by writing only the chunks that differ from the backup point (a quick rollback).

A qcow2 disk backed up with libvirt checkpoints keeps, in its image, a persistent dirty bitmap per
checkpoint (and Raksha's finer ``~fine`` one beside it). With the domain shut off, the disk holds what
the backup taken with checkpoint C (point K) held, except where C's bitmap is set. To bring it to point
R, only two sets of chunks need writing:

- those the bitmap touches (written since K, by the guest or by an earlier restore), and
- those whose content differs between R and K (their manifests compared chunk by chunk: ids and layers).

Everything else already holds R's data. The chunks are written through a writable qemu-nbd, so QEMU marks
them in every enabled bitmap of the image: the checkpoints stay true (the next backup, incremental to K,
reads what this restore wrote) and a restore that is interrupted is finished by running it again.

A disk is rolled back this way only when all of this holds; otherwise it is rewritten whole, as before:
qcow2 without overlays; a checkpoint of this job whose bitmap is in the image, enabled and consistent (not
left ``in-use`` by a QEMU that died); K's backup of the disk still in the vault with R's chunk size and
disk size. Raw disks are tracked by QEMU bitmaps that do not outlive the shut-off: always rewritten.
"""

from __future__ import annotations

import json
import logging
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from raksha.domain.errors import NotFound, RakshaError
from raksha.hypervisor.pull import FINE_SUFFIX
from raksha.vault.engine.changes import chunks_to_roll_back
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.nbd import NbdInPlace

log = logging.getLogger(__name__)

@dataclass
class Rollback:
    """How one disk is brought back to a point: the chunks to write, and why only those."""

    checkpoint: str
    bitmap: str
    since: BackupId  # the backup taken with the checkpoint: the disk equals it outside the bitmap
    dirty_bytes: int  # what the bitmap marks
    chunks: list[int]  # sorted
    target: NbdInPlace  # the disk, open for writing; the caller closes it

    def describe(self) -> str:
        return (f"{len(self.chunks)} chunk(s) written in place: those that differ from {self.since.run} and "
                f"those bitmap {self.bitmap} marks ({self.dirty_bytes} bytes written since)")


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
        bitmap = next((b for b in (checkpoint + FINE_SUFFIX, checkpoint) if _usable(bitmaps.get(b))), None)
        if bitmap is None:
            why.append(f"{checkpoint}: no enabled, consistent bitmap in {path}")
            continue
        since = BackupId(job, run, disk.vm, disk.resource)
        try:
            base = vault.read_manifest(since)
        except NotFound:
            why.append(f"{checkpoint}: backup {since} is not in the vault")
            continue
        if (base.chunk_size, base.virtual_size) != (point.chunk_size, point.virtual_size):
            why.append(f"{checkpoint}: backup {since} has another chunk or disk size")
            continue
        try:
            target = NbdInPlace(path, "qcow2", bitmap=bitmap)
        except RakshaError as exc:
            why.append(f"{checkpoint}: {exc}")
            continue
        try:
            dirty = target.dirty_extents()
            chunks = chunks_to_roll_back(point, base, dirty)
        except BaseException:
            target.close()
            raise
        return Rollback(checkpoint, bitmap, since, sum(n for _, n in dirty), chunks, target)
    return "; ".join(why)

