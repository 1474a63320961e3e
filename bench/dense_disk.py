"""Peak RSS on a large dense disk (issue 3: "peak RSS <= 150 MB at any image size").

``bench/large_disk.py`` measures a 1 TiB *sparse* disk: what grows with a disk's data (its distinct
chunks) never shows there. Here every chunk holds data and no two are alike: nbdkit's ``pattern``
plugin (each 8 bytes hold their own offset) serves a disk of --size over NBD, backed up through the
same ``NbdSource`` that reads qcow2 images and live VMs, into a plaintext vault of --chunk-kib chunks
(default 64 KiB: a 64 GiB disk is then a million chunks, as a 1 TiB disk at the default 1 MiB, in a
fraction of the time and space). The pattern compresses to ~9%. Then an incremental of 200 extents of
100 KiB on it (the export is the same: what the phase holds, not what it stores, is measured), and the
backup is restored to a raw file (dense: --size bytes written, so only if the disk has room) and
compared with the export.

Each phase runs in a process of its own; its peak RSS (os.wait4) is the figure, against 150 MB.
Plaintext: the key derivation's 64 MiB would hide what the phases themselves hold.

Then a verify (every stored chunk re-read) and a gc (nothing to free: the whole mark) of that vault.

    .venv/bin/python bench/dense_disk.py [--size 64G] [--chunk-kib 64] [--workdir DIR] [--no-restore]
        [--phases backup,incremental,restore,verify,gc] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import imagegen  # noqa: E402
from peak_rss import run_measured  # noqa: E402

TARGET_MB = 150.0
BID = "dense/run1/vm1/vda"
INCREMENTAL = "dense/run2/vm1/vda"

BACKUP = """
import json, sys
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.nbd import NbdSource
vault = Vault.open(LocalBackend(sys.argv[1]), None)
source = NbdSource(sys.argv[2], path="nbdkit pattern", fmt="raw")
parent = BackupId.parse(sys.argv[4]) if len(sys.argv) > 4 else None
changed = [tuple(e) for e in json.loads(sys.argv[5])] if len(sys.argv) > 5 else None
try:
    stats = backup_disk(vault, source, BackupId.parse(sys.argv[3]), parent=parent, changed_extents=changed).stats
finally:
    source.close()
print(stats.chunks_new, stats.bytes_stored, stats.bytes_read)
"""

RESTORE = """
import sys
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
vault = Vault.open(LocalBackend(sys.argv[1]), None)
print(restore_backup(vault, BackupId.parse(sys.argv[3]), sys.argv[2]).chunks_verified)
"""

VERIFY = """
import sys
from raksha.vault.backends.local import LocalBackend
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault
report = verify_vault(Vault.open(LocalBackend(sys.argv[1]), None))
print(int(report.ok), report.chunks_checked, report.bytes_read)
"""

GC = """
import sys
from raksha.vault.backends.local import LocalBackend
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.repository import Vault
report = collect_garbage(Vault.open(LocalBackend(sys.argv[1]), None), grace=0.0)
print(report.live_chunks, report.packs_total, report.bytes_freed)
"""

COMPARE = """
import sys
from raksha.vault.sources.nbd import NbdSource
source = NbdSource(sys.argv[1], path="nbdkit pattern", fmt="raw")
step = 8 << 20
with open(sys.argv[2], "rb") as f:
    for offset in range(0, source.virtual_size, step):
        n = min(step, source.virtual_size - offset)
        if f.read(n) != source.pread(offset, n):
            sys.exit(f"restored image differs from the export at {offset}")
source.close()
"""


def run(script: str, *args: str) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and output of one phase in a fresh process, which must succeed."""
    seconds, rss, code, out, err = run_measured([sys.executable, "-c", script, *args])
    if code != 0:
        raise SystemExit(f"phase failed: {err.decode(errors='replace').strip()[-2000:]}")
    return seconds, rss, out.decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64G")
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-dense")
    parser.add_argument("--no-restore", action="store_true")
    parser.add_argument("--phases", default="backup,incremental,restore,verify,gc",
                        help="phases to run, in this order; without backup the vault in --workdir is reused")
    parser.add_argument("--keep", action="store_true", help="keep --workdir (the vault) afterwards")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "dense-disk.json")
    args = parser.parse_args()
    size = imagegen.parse_size(args.size)
    if shutil.which("nbdkit") is None:
        raise SystemExit("nbdkit is not installed (scripts/setup.sh --bench installs it)")
    wanted = set(args.phases.split(","))
    work = args.workdir
    vault = work / "vault"
    if "backup" in wanted:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    elif not vault.is_dir():
        raise SystemExit(f"no vault in {work} to reuse: run the backup phase first (--keep)")
    sock = work / "pattern.sock"
    sock.unlink(missing_ok=True)  # a kept workdir's
    server = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), "pattern", f"size={size}"])
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        if "backup" in wanted:
            subprocess.run([str(ROOT / ".venv" / "bin" / "raksha"), "vault", "init", str(vault),
                            "--chunk-size", str(args.chunk_kib << 10)], check=True, stdout=subprocess.DEVNULL)
        chunks = -(-size // (args.chunk_kib << 10))
        print(f"dense disk of {size / 2**30:.0f} GiB (nbdkit pattern), {args.chunk_kib} KiB chunks: {chunks:,} "
              "chunks, all distinct")
        phases: dict[str, dict[str, float]] = {}
        if "backup" in wanted:
            seconds, peak, out = run(BACKUP, str(vault), str(sock), BID)
            new, stored, _ = (int(x) for x in out.split())
            phases["backup"] = {"seconds": seconds, "peak_rss_mb": peak / 1e6, "chunks_new": new,
                                "bytes_stored": stored}
        # An incremental of 200 extents of 100 KiB (the export does not change: the engine reads them and
        # finds them stored): what it holds is the parent's ids and the vault's stored ids, a million each.
        rng = random.Random(7)
        extents = sorted((rng.randrange(0, size - (100 << 10)) // 4096 * 4096, 100 << 10) for _ in range(200))
        if "incremental" in wanted:
            seconds, peak, out = run(BACKUP, str(vault), str(sock), INCREMENTAL, BID, json.dumps(extents))
            phases["incremental"] = {"seconds": seconds, "peak_rss_mb": peak / 1e6,
                                     "bytes_read": int(out.split()[2])}
        room = shutil.disk_usage(work).free
        if "restore" not in wanted:
            pass
        elif args.no_restore or room < size + (2 << 30):
            print(f"restore skipped: {'--no-restore' if args.no_restore else f'{room / 2**30:.0f} GiB free'}")
        else:
            restored = work / "restored.img"
            seconds, peak, out = run(RESTORE, str(vault), str(restored), BID)
            phases["restore"] = {"seconds": seconds, "peak_rss_mb": peak / 1e6, "chunks_verified": int(out)}
            run(COMPARE, str(sock), str(restored))
            restored.unlink()
            print("restored image identical to the export")
        if "verify" in wanted:
            # Every stored chunk re-read and re-hashed: what verify holds follows the vault, not one disk.
            seconds, peak, out = run(VERIFY, str(vault))
            ok_flag, checked, read = (int(x) for x in out.split())
            if not ok_flag:
                raise SystemExit("verify found damage in the bench vault")
            phases["verify"] = {"seconds": seconds, "peak_rss_mb": peak / 1e6, "chunks_checked": checked,
                                "bytes_read": read}
        if "gc" in wanted:
            # Nothing to free (both backups are kept): the whole mark, classification and index rewrite.
            seconds, peak, out = run(GC, str(vault))
            live, packs, _freed = (int(x) for x in out.split())
            phases["gc"] = {"seconds": seconds, "peak_rss_mb": peak / 1e6, "live_chunks": live, "packs": packs}
    finally:
        server.terminate()
        server.wait()
    ok = all(p["peak_rss_mb"] <= TARGET_MB for p in phases.values())
    for name, p in phases.items():
        status = "PASS" if p["peak_rss_mb"] <= TARGET_MB else "MISS"
        print(f"  {name:8s} {p['seconds']:7.1f} s  peak RSS {p['peak_rss_mb']:6.1f} MB  "
              f"target {TARGET_MB:.0f} MB  {status}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size": size, "chunk_size": args.chunk_kib << 10, "chunks": chunks,
                                         "target_mb": TARGET_MB, "phases": phases}, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
