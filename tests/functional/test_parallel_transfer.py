"""After the point in time is taken, the VMs of a group are transferred side by side (issue 4: "start
every disk's backup job, thaw, then transfer in parallel"), each VM's disks one after another.

Two real guests with 48 MiB of random data on a raw disk each; the progress events of each VM's
transfer give its first and last moment, and those intervals overlap, or do not with one at a time.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.progress import ProgressEvent  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


class Spans:
    """Each VM's transfer: the first and the last moment one of its disks reported progress.

    A VM's first report waits (in its transfer's thread) until the other VM's transfer has reported
    too, for at most a few seconds: side by side both are in flight then, and the spans overlap however
    fast the machine; one at a time, the wait runs out and the second starts after the first ends. (Left
    to the clock alone, a fast host sometimes finished one 48 MiB transfer before the other's first chunk.)
    """

    WAIT = 3.0

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Condition()

    def __call__(self, vm: str, disk: str, event: ProgressEvent) -> None:
        with self.lock:
            first = vm not in self.seen
            span = self.seen.setdefault(vm, [time.monotonic(), 0.0])
            span[1] = time.monotonic()
            if first:
                self.lock.notify_all()
                self.lock.wait_for(lambda: len(self.seen) == 2, timeout=self.WAIT)
                span[1] = time.monotonic()

    def overlap(self) -> bool:
        (a0, a1), (b0, b1) = self.seen.values()
        return a0 < b1 and b0 < a1


@pytest.mark.parametrize("parallel", [2, 1])
def test_the_vms_of_a_group_are_transferred_side_by_side(conn: libvirt.virConnect, tmp_path: Path,
                                                         parallel: int) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new())
    disks = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.raw"
        path.write_bytes(os.urandom(48 << 20))
        disks.append(path)
    with GuestDomain(conn, build_guest(), [(disks[0], "raw")], tmp_path, agent=False) as one, \
            GuestDomain(conn, build_guest(), [(disks[1], "raw")], tmp_path, agent=False) as two:
        spans = Spans()
        result = backup_domains(conn, [one.name, two.name], vault, "job", "r1", progress=spans,
                                parallel_vms=parallel)
        assert [vm.error for vm in result.vms] == [None, None]
        assert [vm.name for vm in result.vms] == [one.name, two.name]  # results keep the group's order
        assert all(d.bytes_read >= 48 << 20 for vm in result.vms for d in vm.disks)
        assert spans.overlap() is (parallel > 1)
