"""`make demo`'s main job as a test: the CLI drives `raksha serve` through a full, an incremental and a
restore to new VMs of two real guests, which boot with the data, and a mistake undone in place (scripts/demo.py
exits non-zero otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha_server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_protects_two_guests_and_brings_them_back(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--data-dir", str(tmp_path / "demo"),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "both files match in both VMs" in proc.stdout
    assert "incremental available" in proc.stdout
    assert "written (only what differs)" in proc.stdout and "tuesday.bin is back" in proc.stdout  # undone in place
