"""Pull and snapshot backups whether QEMU runs as libvirt-qemu (Debian's default, which the tests keep) or
as root (``user = "root"`` in qemu.conf, as some hosts do).

QEMU creates the pull job's export socket and opens its scratch images and the snapshot strategy's
overlays, so they must lie where QEMU's user can reach them and no other can read them. The root
variant restarts libvirtd with QEMU as root, and as before afterwards.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk, qemu_running_as, start_libvirtd  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.hypervisor.pull import consistency_group  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

DEFAULT_USER = "libvirt-qemu"


@pytest.fixture(scope="module", params=[DEFAULT_USER, "root"])
def qemu_user(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    """A connection to libvirtd with QEMU running as the param, and that user."""
    user = request.param
    if os.geteuid() != 0:
        pytest.skip("libvirtd needs root")
    try:
        pwd.getpwnam(user)
    except KeyError:
        pytest.skip(f"no {user} user (the libvirt-daemon-system package makes it)")
    build_guest()  # before a restart: building it may start a guest of its own
    with qemu_running_as(user) if user != DEFAULT_USER else nullcontext(start_libvirtd()) as uri:
        c = libvirt.open(uri)
        try:
            yield c, user
        finally:
            c.close()


def test_a_guest_gets_full_and_incremental_backups(qemu_user: tuple[Any, str], tmp_path: Path) -> None:
    user_conn, user = qemu_user
    images = tmp_path
    who = pwd.getpwnam(user)
    qcow2 = make_data_disk(images / "a.qcow2", "64M", seed_dir=None)
    raw = make_data_disk(images / "b.raw", "64M", seed_dir=None, fmt="raw")
    vault = Vault.init(LocalBackend(images / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(user_conn, build_guest(), [(qcow2, "qcow2"), (raw, "raw")], images,
                     name=f"raksha-qemu-{user}") as vm:
        assert vm.dom is not None
        pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
        qemu = os.stat(f"/proc/{pid}")
        assert qemu.st_uid == who.pw_uid
        vm.wait_for_agent()

        # The socket and the scratch images: in a directory QEMU owns, the images private to it.
        with consistency_group([(vm.dom, None)], "probe") as point:
            (p,) = point.domains
            assert p.error is None and p.started and p.qemu_owner == (qemu.st_uid, qemu.st_gid)
            home = os.stat(os.path.dirname(p.socket))
            assert home.st_uid == who.pw_uid and stat.S_IMODE(home.st_mode) == 0o700
            assert p.scratch_made

        full_then_incremental(user_conn, vm, vault, images, "qu", seek=7)


def test_the_snapshot_strategy(qemu_user: tuple[Any, str], tmp_path: Path) -> None:
    """The seed's strategy makes its overlays beside the disks and reads them with its own qemu-nbd:
    QEMU must be able to open the overlays it is pivoted onto."""
    user_conn, user = qemu_user
    images = tmp_path
    qcow2 = make_data_disk(images / "c.qcow2", "64M", seed_dir=None)
    raw = make_data_disk(images / "d.raw", "64M", seed_dir=None, fmt="raw")
    vault = Vault.init(LocalBackend(images / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(user_conn, build_guest(), [(qcow2, "qcow2"), (raw, "raw")], images,
                     name=f"raksha-qemu-{user}-snap") as vm:
        assert vm.dom is not None
        vm.wait_for_agent()
        runs = full_then_incremental(user_conn, vm, vault, images, "qs", seek=3, strategy="snapshot")
        assert not any(got.warnings for got in runs), [got.warnings for got in runs]


def full_then_incremental(conn: Any, vm: GuestDomain, vault: Vault, images: Path, job: str, *, seek: int,
                          **options: Any) -> list[Any]:
    """A full of both disks, 64 KiB written to vdb at block ``seek`` (of 64 KiB), an incremental of both;
    the incremental's vdb restored holds what was written. Each run's result for the VM."""
    assert vm.dom is not None
    written = os.urandom(64 << 10)
    runs = []
    for run, parent in (("r1", None), ("r2", "r1")):
        if parent:
            assert vm.exec(f"dd of=/dev/vdb bs=65536 seek={seek} conv=notrunc,fsync 2>/dev/null",
                           stdin=written)[0] == 0
        (got,) = backup_domains(conn, [vm.name], vault, job, run, parent_run=parent, **options).vms
        assert got.error is None, got.error
        assert [d.kind for d in got.disks] == (["full", "full"] if parent is None
                                              else ["incremental", "incremental"])
        runs.append(got)
    out = images / f"{job}-vdb.raw"
    restore_backup(vault, BackupId(job, "r2", vm.dom.UUIDString(), "vdb"), str(out))
    with open(out, "rb") as f:
        f.seek(seek * 65536)
        assert f.read(len(written)) == written
    return runs
