"""QEMU's block layer through libvirt: QMP commands, a domain's block nodes and their dirty bitmaps, and
a bitmap's extents read over NBD. Shared by the pull backup (pull.py) and the restore in place
(rollback.py)."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu

from raksha.vault.sources.base import ExtentArray
from raksha.vault.sources.nbd import NbdSource

READ_SUFFIX = "~read"  # the frozen copy of a bitmap that is exported and read


class QmpError(Exception):
    """QEMU answered a monitor command with an error (or libvirt would not pass it on)."""


def qmp(dom: libvirt.virDomain, command: str, **arguments: Any) -> Any:
    """One QMP command through libvirt. libvirt marks the domain tainted ("custom-monitor") the first time."""
    cmd = {"execute": command, **({"arguments": arguments} if arguments else {})}
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0))
    except libvirt.libvirtError as exc:
        raise QmpError(exc.get_error_message()) from exc
    if "error" in reply:
        raise QmpError(reply["error"].get("desc", str(reply["error"])))
    return reply.get("return")


def aliases(domain_xml: str) -> dict[str, str]:
    """Disk target -> the device alias QEMU knows it by (virtio-disk1, ...)."""
    out = {}
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        target, alias = disk.find("target"), disk.find("alias")
        if target is not None and alias is not None:
            out[target.get("dev", "")] = alias.get("name", "")
    return out


def top_nodes(dom: libvirt.virDomain, domain_xml: str | None = None) -> dict[str, dict[str, Any]]:
    """Disk target -> the top block node QEMU writes it through (query-block's ``inserted``). ``domain_xml``:
    the running domain's XML if the caller has it (the disks' aliases), else it is fetched."""
    by_alias = {alias: target for target, alias in aliases(domain_xml or dom.XMLDesc(0)).items()}
    out = {}
    for dev in qmp(dom, "query-block"):
        qdev = str(dev.get("qdev", ""))
        alias = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        if alias in by_alias and "inserted" in dev:
            out[by_alias[alias]] = dev["inserted"]
    return out


def image_chain(node: dict[str, Any]) -> list[dict[str, str]]:
    """The image and its backing files, as ``qemu-img info --backing-chain`` names them (no process to run)."""
    out = []
    image = node.get("image")
    while isinstance(image, dict):
        out.append({"filename": str(image.get("filename", "")), "format": str(image.get("format", ""))})
        image = image.get("backing-image")
    return out


def node_bitmaps(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A block node's dirty bitmaps (from ``top_nodes``), by name."""
    return {b["name"]: b for b in node.get("dirty-bitmaps", []) if "name" in b}


def recording(bitmap: dict[str, Any]) -> bool:
    """The bitmap records every write and can be used: consistent, enabled, not held by an export or job."""
    return not bitmap.get("inconsistent") and bool(bitmap.get("recording", True)) and not bitmap.get("busy")


def try_qmp(dom: libvirt.virDomain, command: str, **arguments: Any) -> bool:
    """``qmp``, for cleanups: whether QEMU did it."""
    try:
        qmp(dom, command, **arguments)
    except QmpError:
        return False
    return True


def read_bitmap(dom: libvirt.virDomain, socket: str, node: str, bitmap: str, export: str, *,
                granularity: int | None = None,
                release: Callable[[Callable[[], None]], None] | None = None) -> ExtentArray:
    """The extents QEMU bitmap ``bitmap`` of block node ``node`` marks, read through a disabled copy (QEMU
    exports no enabled bitmap read-only; the bitmap itself keeps recording) exported as ``export`` on the
    domain's NBD server at ``socket``. Raises QmpError or RakshaError.

    ``release``: given the removal of the export and the copy once the extents are read, to run it later
    (two QMP round trips a disk that need not delay a backup's reads); by default it runs before returning,
    and always when the read failed."""
    copy = bitmap + READ_SUFFIX
    added = exported = False

    def remove() -> None:
        if exported:
            try_qmp(dom, "block-export-del", id=export, mode="hard")
        if added:
            for _ in range(50):  # the export lets go of the bitmap once its last client is gone
                if try_qmp(dom, "block-dirty-bitmap-remove", node=node, name=copy):
                    break
                time.sleep(0.02)

    read = False
    try:
        qmp(dom, "transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": node, "name": copy, "persistent": False, "disabled": True,
                      **({"granularity": granularity} if granularity else {})}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": copy, "bitmaps": [bitmap]}}])
        added = True
        qmp(dom, "block-export-add", type="nbd", id=export, name=export, writable=False, bitmaps=[copy],
            **{"node-name": node})
        exported = True
        src = NbdSource(socket, path=f"{dom.name()}:{node} bitmap", fmt="raw", export_name=export,
                        dirty_bitmap=f"qemu:dirty-bitmap:{copy}")
        try:
            extents = src.dirty_extents()
        finally:
            src.close()
        read = True
        return extents
    finally:
        if read and release is not None:
            release(remove)
        else:
            remove()
