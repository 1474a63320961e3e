"""What a libvirt domain's disks are, read from its XML: the driver's discovery step."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class DiskInfo:
    target: str  # vda, vdb, ...
    path: str  # file path or block device
    source_type: str  # file | block
    format: str  # raw | qcow2 | ...
    bus: str
    device: str  # disk (cdroms and floppies are not backed up)


def domain_disks(domain_xml: str) -> list[DiskInfo]:
    """The backup-able disks of a domain, in target order; cdroms, floppies and network disks are left out."""
    root = ET.fromstring(domain_xml)
    out = []
    for disk in root.findall("./devices/disk"):
        device = disk.get("device", "disk")
        source_type = disk.get("type", "file")
        source = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        if device != "disk" or source_type not in ("file", "block") or source is None or target is None:
            continue
        path = source.get("file") if source_type == "file" else source.get("dev")
        if not path:
            continue
        out.append(DiskInfo(
            target=target.get("dev", ""),
            path=path,
            source_type=source_type,
            format=(driver.get("type") if driver is not None else None) or "raw",
            bus=target.get("bus", ""),
            device=device,
        ))
    return sorted(out, key=lambda d: (len(d.target), d.target))


def domain_interfaces(domain_xml: str) -> list[dict[str, str]]:
    """The seed's "network mappings": each interface's MAC, type, source network or bridge, and model."""
    root = ET.fromstring(domain_xml)
    out = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        source = iface.find("source")
        model = iface.find("model")
        out.append({
            "type": iface.get("type", ""),
            "mac": mac.get("address", "") if mac is not None else "",
            "source": next((source.get(k, "") for k in ("network", "bridge", "dev") if source is not None
                            and source.get(k)), ""),
            "model": model.get("type", "") if model is not None else "",
        })
    return out


def backing_chain(path: str) -> list[dict[str, str]]:
    """The image and its backing files (a shared base image shows up here), read while the VM runs."""
    try:
        res = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    return [{"filename": str(i.get("filename", "")), "format": str(i.get("format", ""))}
            for i in json.loads(res.stdout)]
