"""qemu-nbd exports (raksha.vault.sources.nbd): one a killed Raksha process left running is ended by the
next export, and one whose owner runs is left alone. Real qemu-nbd processes, real SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from raksha.vault.processes import alive
from raksha.vault.sources.nbd import QemuNbdExport


def _export_pid(socket: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-nbd") and f"--socket={socket}".encode() in argv:
                return int(entry)
    raise AssertionError(f"no qemu-nbd serves {socket}")


def test_an_export_a_killed_process_left_is_ended_by_the_next_one(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom raksha.vault.sources.nbd import QemuNbdExport\n"
                               f"print(QemuNbdExport({str(image)!r}, 'raw').socket, flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    left = owner.stdout.readline().strip()
    orphan = _export_pid(left)
    mine = QemuNbdExport(str(image), "raw")  # a live owner's export: never touched
    owner.kill()
    owner.wait()
    assert alive(orphan), "--persistent: the export outlives the process that started it"

    other = QemuNbdExport(str(image), "raw")
    try:
        assert not alive(orphan) and not os.path.exists(os.path.dirname(left))
        assert alive(_export_pid(mine.socket)) and os.path.exists(mine.socket)
    finally:
        other.close()
        mine.close()
