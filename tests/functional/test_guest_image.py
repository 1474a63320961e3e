"""The shared test guest (``scripts/build-test-guest.sh``) builds, caches and boots.

Boots the cached kernel + initramfs directly under QEMU/TCG with one ext4 data disk and the guest
agent's virtio-serial port, then drives qemu-ga over its unix socket: sync/ping, writes a known file
on the data disk with ``guest-exec`` and reads it back, freezes the filesystem and checks that the
disk image on the host holds exactly what was written (``debugfs``, while frozen), then thaws.
See docs/design/test-guests.md.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-test-guest.sh"
BOOT_BUDGET_S = 60.0  # the guest must answer guest-sync this soon after QEMU starts (TCG)
AGENT_WAIT_S = 150.0  # hard limit before the test gives up on the agent

pytestmark = pytest.mark.slow


class AgentError(RuntimeError):
    pass


class Agent:
    """A minimal qemu-ga client: one JSON command per line, one JSON response per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.ids = itertools.count(1000)

    def connect(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _readline(self, deadline: float) -> bytes | None:
        assert self.sock is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("agent socket closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def sync(self, timeout: float) -> bool:
        """guest-sync with a fresh id; True once the matching reply arrives (stale replies skipped)."""
        assert self.sock is not None
        sync_id = next(self.ids)
        self.sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": sync_id}}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while (line := self._readline(deadline)) is not None:
            try:
                msg = json.loads(line.strip(b"\xff").decode(errors="replace"))
            except ValueError:
                continue
            if msg.get("return") == sync_id:
                return True
        return False

    def call(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        assert self.sock is not None
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        line = self._readline(time.monotonic() + timeout)
        if line is None:
            raise TimeoutError(f"no reply to {command} within {timeout}s")
        msg = json.loads(line)
        if "error" in msg:
            raise AgentError(f"{command}: {msg['error']}")
        return msg["return"]

    def exec(self, script: str, stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``/bin/sh -c script`` in the guest; returns (exitcode, stdout, stderr)."""
        args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.call("guest-exec", **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", pid=pid)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", ""))
                err = base64.b64decode(status.get("err-data", ""))
                return status.get("exitcode", -1), out, err
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest-exec {script!r} still running after {timeout}s")
            time.sleep(0.1)


def _ensure_qemu() -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.geteuid() != 0:
        pytest.skip("qemu-system-x86_64 is not installed and installing it needs root")
    # The build script installs qemu-system-x86 when it is missing.
    proc = subprocess.run([str(BUILD)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip(f"qemu-system-x86_64 could not be installed: {proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def guest_cache() -> Path:
    """Build the guest into its cache (``RAKSHA_GUEST_CACHE`` or /var/cache/raksha/test-guest)."""
    _ensure_qemu()
    env = dict(os.environ)
    proc = subprocess.run([str(BUILD)], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"test guest not cached and building it needs root: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    cache = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("vmlinuz", "initramfs.img", "stamp"):
        assert (cache / name).is_file(), f"{name} missing from {cache}"

    # A second run with the cache present does nothing and is fast.
    t0 = time.monotonic()
    again = subprocess.run([str(BUILD)], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - t0
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(cache)
    assert elapsed < 1.0, f"cached run took {elapsed:.2f}s"
    return cache


@pytest.fixture
def booted_guest(guest_cache: Path, tmp_path: Path) -> Iterator[tuple[Agent, Path, float]]:
    """Boot the guest with one ext4 data disk; yields (agent, data image, boot seconds)."""
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "seed.txt").write_bytes(b"seeded by mkfs.ext4 -d\n")
    data = tmp_path / "data.img"
    subprocess.run([str(BUILD), "data-disk", str(data), "64M", str(seed)], check=True, capture_output=True)

    qga_sock = tmp_path / "qga.sock"
    console = tmp_path / "console.log"
    cmd = [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-m", "256",
        "-nographic",
        "-kernel", str(guest_cache / "vmlinuz"),
        "-initrd", str(guest_cache / "initramfs.img"),
        "-append", "console=ttyS0 quiet",
        "-drive", f"file={data},format=raw,if=virtio",
        "-device", "virtio-serial",
        "-chardev", f"socket,path={qga_sock},server=on,wait=off,id=qga0",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    agent = Agent(qga_sock)
    with console.open("wb") as log:
        t0 = time.monotonic()
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            boot_s = _wait_for_agent(agent, qemu, t0, console)
            yield agent, data, boot_s
        finally:
            agent.close()
            qemu.kill()
            qemu.wait(timeout=30)


def _wait_for_agent(agent: Agent, qemu: subprocess.Popen[bytes], t0: float, console: Path) -> float:
    while time.monotonic() - t0 < AGENT_WAIT_S:
        if qemu.poll() is not None:
            pytest.fail(f"qemu exited with {qemu.returncode}:\n{console.read_text(errors='replace')[-3000:]}")
        try:
            if agent.sock is None:
                agent.connect()
            if agent.sync(timeout=2.0):
                return time.monotonic() - t0
        except (FileNotFoundError, ConnectionError, OSError):
            agent.close()
            time.sleep(0.5)
    pytest.fail(f"guest agent silent after {AGENT_WAIT_S:.0f}s:\n{console.read_text(errors='replace')[-3000:]}")


def _debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return proc.stdout


def test_cache_stamp_records_package_versions(guest_cache: Path) -> None:
    stamp = dict(line.split("=", 1) for line in (guest_cache / "stamp").read_text().splitlines() if "=" in line)
    for key in ("recipe", "kernel_package", "kernel_version", "qemu_guest_agent", "busybox_static"):
        assert stamp.get(key), f"stamp lacks {key}: {stamp}"
    # Readable by libvirt-qemu later: 755 dir, 644 files.
    assert guest_cache.stat().st_mode & 0o777 == 0o755
    for name in ("vmlinuz", "initramfs.img", "stamp"):
        assert (guest_cache / name).stat().st_mode & 0o777 == 0o644


def test_guest_boots_and_agent_writes_known_data(booted_guest: tuple[Agent, Path, float]) -> None:
    agent, data, boot_s = booted_guest
    print(f"guest agent answered {boot_s:.1f}s after qemu start (TCG)")
    assert boot_s < BOOT_BUDGET_S * 1.5, f"boot took {boot_s:.1f}s (budget ~{BOOT_BUDGET_S:.0f}s)"

    assert agent.call("guest-ping") == {}

    # The data disk is mounted read-write and holds what mkfs.ext4 -d put there.
    code, out, err = agent.exec("grep ' /mnt/vda ' /proc/mounts && cat /mnt/vda/seed.txt")
    assert code == 0, err
    assert b"/dev/vda /mnt/vda ext4 rw" in out
    assert out.endswith(b"seeded by mkfs.ext4 -d\n")

    # Write a known file through guest-exec (stdin), sync, and read it back (base64 out-data).
    known = hashlib.sha256(b"raksha").digest() * 2048  # 64 KiB, exactly known
    code, _, err = agent.exec("cat > /mnt/vda/known.bin && sync", stdin=known)
    assert code == 0, err
    code, out, err = agent.exec("cat /mnt/vda/known.bin")
    assert code == 0, err
    assert out == known

    # Freeze: the point in time is on the disk image, and the host sees exactly it.
    assert agent.call("guest-fsfreeze-freeze") >= 1
    try:
        assert agent.call("guest-fsfreeze-status") == "frozen"
        assert _debugfs_cat(data, "/known.bin") == known
        assert _debugfs_cat(data, "/seed.txt") == b"seeded by mkfs.ext4 -d\n"
    finally:
        thawed = agent.call("guest-fsfreeze-thaw")
    assert thawed >= 1
    assert agent.call("guest-fsfreeze-status") == "thawed"

    # Writes work again after the thaw.
    code, out, err = agent.exec("echo after-thaw > /mnt/vda/after.txt && sync && cat /mnt/vda/after.txt")
    assert code == 0, err
    assert out == b"after-thaw\n"
    assert _debugfs_cat(data, "/after.txt") == b"after-thaw\n"
