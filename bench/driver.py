"""Driver benchmark (issue 4): a live 2 GiB data disk of a running TCG guest, full then 1%-changed incremental.

Prints and writes bench/results/driver.json: bytes read, seconds, freeze window and peak RSS of the
full and of the incremental (checkpoint dirty bitmap), against the targets: incremental reads
<= 1.1 x changed + 1 MiB per disk, incremental time <= 5% of the full, freeze <= 0.5 s per group.
Run as root after scripts/setup.sh: `.venv/bin/python bench/driver.py [--size 2G]`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "functional"))
sys.path.insert(0, str(ROOT / "bench"))
from libvirt_guests import GuestDomain, build_guest, start_libvirtd  # noqa: E402

import imagegen  # noqa: E402
from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

MIB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-driver")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "driver.json")
    args = parser.parse_args()
    size = imagegen.parse_size(args.size)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw, disk = work / "data.raw", work / "data.qcow2"
    subprocess.run([sys.executable, str(ROOT / "bench" / "imagegen.py"), str(raw), "--size", args.size],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()
    conn = libvirt.open(start_libvirtd())
    vault = Vault.init(LocalBackend(work / "vault", create=True), VaultConfig.new())
    rng = random.Random(7)
    extents = sorted(rng.sample(range(0, size // 4096 - 64), 200))
    changed = 200 * 25 * 4096  # 200 extents of 100 KiB: ~1% of 2 GiB
    script = "; ".join(f"dd if=/dev/urandom of=/dev/vda bs=4096 seek={o} count=25 conv=notrunc 2>/dev/null"
                       for o in extents) + "; sync"
    out: dict[str, dict[str, float]] = {}
    with GuestDomain(conn, build_guest(), [(disk, "qcow2")], work, name="raksha-bench-driver") as vm:
        vm.wait_for_agent()
        t = time.monotonic()
        full = backup_domains(conn, [vm.name], vault, "bench", "full")
        out["full"] = {"seconds": time.monotonic() - t, "bytes_read": full.vms[0].disks[0].bytes_read,
                       "freeze_ms": full.freeze_ms}
        code, _ = vm.exec(script, timeout=600)
        assert code == 0, "writing the changes in the guest failed"
        t = time.monotonic()
        incr = backup_domains(conn, [vm.name], vault, "bench", "incr", parent_run="full")
        out["incremental"] = {"seconds": time.monotonic() - t, "bytes_read": incr.vms[0].disks[0].bytes_read,
                              "freeze_ms": incr.freeze_ms}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    allowance = 1.1 * changed + MIB
    figures = {
        "incremental bytes read": (out["incremental"]["bytes_read"], allowance,
                                   out["incremental"]["bytes_read"] <= allowance),
        "incremental time / full": (out["incremental"]["seconds"] / out["full"]["seconds"], 0.05,
                                    out["incremental"]["seconds"] <= 0.05 * out["full"]["seconds"]),
        "freeze window ms (max)": (max(out["full"]["freeze_ms"], out["incremental"]["freeze_ms"]), 500.0,
                                   max(out["full"]["freeze_ms"], out["incremental"]["freeze_ms"]) <= 500),
        "peak RSS bytes": (peak, 150e6, peak <= 150e6),
    }
    print(f"disk {size / 2**30:.1f} GiB qcow2 in a running TCG guest; changed {changed / MIB:.1f} MiB in 200 extents")
    for phase, r in out.items():
        print(f"{phase:12s} {r['seconds']:6.2f} s  read {r['bytes_read'] / MIB:8.1f} MiB  "
              f"freeze {r['freeze_ms']:6.0f} ms")
    for name, (value, target, ok) in figures.items():
        print(f"{name:28s} {value:14.3f}  target {target:14.3f}  {'PASS' if ok else 'MISS'}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size": size, "changed_bytes": changed, "phases": out, "peak_rss_bytes": peak,
                                         "figures": {k: {"value": v, "target": t, "ok": ok}
                                                     for k, (v, t, ok) in figures.items()}}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
