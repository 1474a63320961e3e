"""libvirt errors translated at the hypervisor boundary into Raksha errors with stable codes.

| libvirt | Raksha error | code |
| --- | --- | --- |
| no domain, domain not running | ``VmGone`` | ``VM_GONE`` |
| no checkpoint | ``NotFound`` | ``CHECKPOINT_NOT_FOUND`` |
| unsupported operation or configuration | ``HypervisorError`` | ``HYPERVISOR_UNSUPPORTED`` (permanent) |
| another job running on the domain | ``HypervisorError`` | ``VM_BUSY`` |
| guest agent not answering | ``HypervisorError`` | ``GUEST_AGENT_UNRESPONSIVE`` |
| anything else | ``HypervisorError`` | ``HYPERVISOR_ERROR`` |
"""

from __future__ import annotations

import libvirt

from raksha.domain.errors import HypervisorError, NotFound, RakshaError, VmGone
from raksha.vault.threads import forget_after_each_task

# libvirt keeps a thread's last error until its next API call; a kept thread's next task must not find the
# last one's (a libvirtError built without a call takes its message from it).
forget_after_each_task(libvirt.virResetLastError)


def vm_gone(dom: libvirt.virDomain) -> bool:
    """Whether the domain has stopped running or no longer exists."""
    try:
        return not dom.isActive()
    except libvirt.libvirtError:
        return True


def translate(exc: libvirt.libvirtError, context: str) -> RakshaError:
    code = exc.get_error_code()
    text = exc.get_error_message() or str(exc)
    message = f"{context}: {text}"
    if code == libvirt.VIR_ERR_NO_DOMAIN or (code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in text):
        return VmGone(message)
    if code == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
        return NotFound(message, code="CHECKPOINT_NOT_FOUND")
    if code in (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_NO_SUPPORT):
        err = HypervisorError(message, code="HYPERVISOR_UNSUPPORTED")
        err.retryable = False
        return err
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "job" in text:
        return HypervisorError(message, code="VM_BUSY")
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        return HypervisorError(message, code="GUEST_AGENT_UNRESPONSIVE")
    return HypervisorError(message)
