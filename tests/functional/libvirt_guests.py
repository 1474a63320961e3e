"""Real QEMU guests under a real libvirtd, for the hypervisor tests (issue 4) and the demo.

``start_libvirtd()`` runs scripts/start-libvirtd.sh; ``GuestDomain`` defines and
starts a transient domain from the cached test guest (scripts/build-test-guest.sh)
with a qcow2 data disk and a guest-agent channel, and talks to the agent through
libvirt, as the driver will.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

REPO = Path(__file__).resolve().parents[2]
BUILD_GUEST = REPO / "scripts" / "build-test-guest.sh"
START_LIBVIRTD = REPO / "scripts" / "start-libvirtd.sh"
# TCG here (no /dev/kvm for Linux guests); "kvm" where it works.
DOMAIN_TYPE = os.environ.get("RAKSHA_DOMAIN_TYPE", "qemu")


def start_libvirtd() -> str:
    out = subprocess.run([str(START_LIBVIRTD)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@contextmanager
def qemu_running_as(user: str) -> Iterator[str]:
    """libvirtd restarted with QEMU running as ``user`` (the tests keep Debian's default, libvirt-qemu), and
    restarted as before on exit. Yields the URI: connections made before do not survive. Run no guest
    across it."""
    conf = Path("/etc/libvirt/qemu.conf")
    original = conf.read_text()
    # Appended: the later settings are the ones libvirt reads.
    conf.write_text(original + f'\n# raksha: tests, for now\nuser = "{user}"\ngroup = "{user}"\n')
    try:
        yield _restart_libvirtd()
    finally:
        conf.write_text(original)
        _restart_libvirtd()


def _restart_libvirtd() -> str:
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise TimeoutError("libvirtd did not stop within 30 s")
        time.sleep(0.1)
    return start_libvirtd()


def build_guest() -> Path:
    out = subprocess.run([str(BUILD_GUEST)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=900, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def make_data_disk(path: Path, size: str, seed_dir: Path | None = None, fmt: str = "qcow2") -> Path:
    """An ext4 data disk (made with mkfs.ext4 -d), raw or converted to qcow2."""
    raw = path.with_suffix(".raw") if fmt != "raw" else path
    args = [str(BUILD_GUEST), "data-disk", str(raw), size] + ([str(seed_dir)] if seed_dir else [])
    subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()
    return path


def remove_leftover(conn: libvirt.virConnect, name: str) -> None:
    """A test domain of that fixed name left by an earlier test run that was killed (its session ended
    mid-test): destroyed and undefined, or defining or creating the new one would fail."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    for step in (dom.destroy, lambda: dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)):
        try:
            step()
        except libvirt.libvirtError:
            pass


class GuestDomain:
    """A transient libvirt domain booting the test guest; destroyed on exit."""

    def __init__(self, conn: libvirt.virConnect, guest: Path, disks: list[tuple[Path, str]], workdir: Path,
                 *, name: str | None = None, agent: bool = True) -> None:
        self.conn = conn
        self.name = name or f"raksha-test-{uuid.uuid4().hex[:8]}"
        if name is not None:
            remove_leftover(conn, name)
        self.console = workdir / f"{self.name}.console.log"
        disk_xml = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
            for i, (path, fmt) in enumerate(disks)
        )
        channel = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
                   if agent else "")
        self.xml = f"""<domain type='{DOMAIN_TYPE}'>
  <name>{self.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest / 'vmlinuz'}</kernel><initrd>{guest / 'initramfs.img'}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline></os>
  <devices>{disk_xml}{channel}
    <serial type='file'><source path='{self.console}'/><target port='0'/></serial>
  </devices>
</domain>"""
        self.dom: libvirt.virDomain | None = None

    @classmethod
    def attached(cls, conn: libvirt.virConnect, dom: libvirt.virDomain, workdir: Path) -> GuestDomain:
        """Wrap a domain something else defined (a restore): destroyed and undefined on exit."""
        self = cls.__new__(cls)
        self.conn, self.name, self.dom = conn, dom.name(), dom
        self.console = workdir / f"{self.name}.console.log"
        self.xml = dom.XMLDesc(0)
        return self

    def __enter__(self) -> GuestDomain:
        if self.dom is None:
            self.dom = self.conn.createXML(self.xml, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dom is not None:
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone (a test may destroy it on purpose)
            try:
                if self.dom.isPersistent():
                    self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass

    def agent(self, command: str, timeout: int = 30, **arguments: Any) -> Any:
        assert self.dom is not None
        cmd = {"execute": command, **({"arguments": arguments} if arguments else {})}
        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(cmd), timeout, 0))["return"]

    def wait_for_agent(self, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return time.monotonic() - start
            except libvirt.libvirtError:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"{self.name}: no guest agent after {timeout:.0f} s; console:\n"
                                       + self.console.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.5)

    def exec(self, script: str, stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
        """Run ``script`` with /bin/sh in the guest; return (exit code, stdout)."""
        args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.agent("guest-exec", **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent("guest-exec-status", pid=pid)
            if status["exited"]:
                return status.get("exitcode", -1), base64.b64decode(status.get("out-data", ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest-exec {script!r} still running after {timeout} s")
            time.sleep(0.1)


def debugfs_cat(image: Path, path: str) -> bytes:
    """A file's bytes from an ext4 image, read on the host (empty if it does not exist)."""
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout
