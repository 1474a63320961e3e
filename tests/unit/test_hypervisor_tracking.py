"""Pure parts of the pull strategy's disk tracking: bitmap granularity, libvirt error translation."""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.domain.errors import HypervisorError, NotFound, VmGone  # noqa: E402
from raksha.hypervisor.errors import translate  # noqa: E402
from raksha.hypervisor.pull import MAX_BITMAP_BYTES, _aliases, bitmap_granularity  # noqa: E402

GIB, TIB = 1 << 30, 1 << 40


@pytest.mark.parametrize(("size", "granularity"), [
    (0, 4096), (2 * GIB, 4096), (TIB, 4096), (TIB + 1, 8192), (4 * TIB, 16384),
])
def test_granularity_is_4k_until_a_bitmap_would_pass_32_mib(size: int, granularity: int) -> None:
    assert bitmap_granularity(size) == granularity
    assert size / granularity / 8 <= MAX_BITMAP_BYTES


class FakeLibvirtError(libvirt.libvirtError):
    def __init__(self, code: int, message: str) -> None:
        Exception.__init__(self, message)
        self._code, self._message = code, message

    def get_error_code(self) -> int:
        return self._code

    def get_error_message(self) -> str:
        return self._message


@pytest.mark.parametrize(("code", "message", "kind", "stable_code", "retryable"), [
    (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found", VmGone, "VM_GONE", True),
    (libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running", VmGone, "VM_GONE", True),
    (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, "no checkpoint", NotFound, "CHECKPOINT_NOT_FOUND", False),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "checkpoint for disk vda unsupported for storage type raw",
     HypervisorError, "HYPERVISOR_UNSUPPORTED", False),
    (libvirt.VIR_ERR_OPERATION_INVALID, "another job is active", HypervisorError, "VM_BUSY", True),
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, "agent not connected", HypervisorError, "GUEST_AGENT_UNRESPONSIVE", True),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "something", HypervisorError, "HYPERVISOR_ERROR", True),
])
def test_libvirt_errors_get_stable_codes(code: int, message: str, kind: type, stable_code: str,
                                         retryable: bool) -> None:
    err = translate(FakeLibvirtError(code, message), "vm1: backup")
    assert isinstance(err, kind) and err.code == stable_code and err.retryable is retryable
    assert err.message == f"vm1: backup: {message}"
    assert err.to_dict()["code"] == stable_code


def test_disk_aliases_from_the_live_xml() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
      <disk type='block' device='disk'><target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/></disk>
      <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
    </devices></domain>"""
    assert _aliases(xml) == {"vda": "virtio-disk0", "vdb": "virtio-disk1"}
