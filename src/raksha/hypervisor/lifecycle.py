"""Domain lifecycle around backups: undefining a domain that carries Raksha's checkpoints.

libvirt refuses a plain ``undefine`` of a domain that has checkpoints ("cannot delete
inactive domain with N checkpoints"). ``undefine_domain`` first deletes the
checkpoints it can (with their bitmaps, while the domain runs), then undefines with
``VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA`` so what is left of them never blocks it.
"""

from __future__ import annotations

import libvirt

from raksha.hypervisor.errors import translate


def undefine_domain(dom: libvirt.virDomain, *, snapshots_metadata: bool = True) -> list[str]:
    """Undefine ``dom`` (a running domain becomes transient); return the checkpoints it had."""
    try:
        names = [c.getName() for c in dom.listAllCheckpoints()]
    except libvirt.libvirtError:
        names = []
    if dom.isActive():
        for cp in _roots(dom):
            try:
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
            except libvirt.libvirtError:
                pass  # its metadata goes with the undefine below
    flags = libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    if snapshots_metadata:
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"undefining {dom.name()}") from exc
    return names


def _roots(dom: libvirt.virDomain) -> list[libvirt.virDomainCheckpoint]:
    try:
        return list(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS))
    except libvirt.libvirtError:
        return []
