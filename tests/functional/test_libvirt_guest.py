"""A test guest runs under a real libvirtd (TCG) and answers its agent through libvirt.

This is the ground the libvirt driver's tests (issue 4) stand on: a domain
defined from XML, a qcow2 data disk whose content the test writes and knows,
and fsfreeze/thaw through the agent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import (  # noqa: E402
    GuestDomain,
    build_guest,
    make_data_disk,
)


def test_guest_boots_under_libvirt_and_its_disk_holds_what_the_test_wrote(conn: libvirt.virConnect,
                                                                         tmp_path: Path) -> None:
    guest = build_guest()
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "hello.txt").write_text("seeded\n")
    disk = make_data_disk(tmp_path / "data.qcow2", "64M", seed)
    known = os.urandom(64 << 10)  # one guest-exec message; the agent caps its input size

    with GuestDomain(conn, guest, [(disk, "qcow2")], tmp_path) as vm:
        boot_s = vm.wait_for_agent()
        assert boot_s < 120
        assert vm.dom is not None and vm.dom.isActive()
        code, out = vm.exec("cat /mnt/vda/hello.txt")
        assert (code, out) == (0, b"seeded\n")

        code, _ = vm.exec("cat > /mnt/vda/known.bin && sync", stdin=known)
        assert code == 0
        code, out = vm.exec("sha256sum /mnt/vda/known.bin")
        assert code == 0 and out.split()[0].decode() == hashlib.sha256(known).hexdigest()

        assert vm.agent("guest-fsfreeze-freeze") >= 1
        assert vm.agent("guest-fsfreeze-status") == "frozen"
        assert vm.agent("guest-fsfreeze-thaw") >= 1
        assert vm.agent("guest-fsfreeze-status") == "thawed"

    assert vm.name not in [d.name() for d in conn.listAllDomains()]
