"""Peak RSS on a large sparse disk in a large vault (issue 3: "peak RSS <= 150 MB at any image size").

The 2 GiB benchmark cannot show what grows with the disk's virtual size: a manifest holds one id per
chunk, a million for 1 TiB at 1 MiB chunks. Nor what grows with the vault: every backup and restore
loads the vault's chunk index, a million entries once it holds 1 TiB of data. This makes a sparse
image of --size (default 1 TiB) with 16 regions of 8 MiB of random data, and an encrypted vault
already indexing --vault-chunks (default 1,000,000) chunks of other disks (index objects as backups
write them, merged by 65,536 entries; real chunks, but 4 KiB each), then through
the CLI (default key derivation) times and measures: a full backup, an incremental of 16 small
changed extents (delta layers), a restore of the incremental (compared with the image), a verify, a
list, and a gc, which deletes the other disks' chunks (no backup holds them: a gc after a large prune).
Prints a table against the target and writes bench/results/large-disk.json.

    .venv/bin/python bench/large_disk.py [--size 1T] [--vault-chunks 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import imagegen  # noqa: E402
from peak_rss import run_measured  # noqa: E402

RAKSHA = ROOT / ".venv" / "bin" / "raksha"
TARGET_MB = 150.0
REGIONS, REGION = 16, 8 << 20
OTHER_CHUNK = 4096


def measured(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, which must succeed (peak_rss.py: its own peak,
    not this process's, which holds a large vault's index once it built one)."""
    seconds, rss, code, out, err = run_measured(argv, env)
    if code != 0:
        said = (err or out).decode(errors="replace").strip()
        raise SystemExit(f"{' '.join(argv[:3])} failed (exit {code}): {said[-2000:]}")
    return seconds, rss


def index_other_chunks(vault: Path, count: int, password: str) -> None:
    """Store ``count`` small chunks of other disks in ``vault``, through the backup's own packer.

    They are real (verify reads every pack the index lists), but 4 KiB each, not 1 MiB: what a vault's
    size costs a command is its index's rows, not its packs' bytes."""
    from raksha.vault.backends.local import LocalBackend
    from raksha.vault.engine.packer import Packer
    from raksha.vault.format.blob import BlobEncoder
    from raksha.vault.format.keys import Secret
    from raksha.vault.repository import Vault

    opened = Vault.open(LocalBackend(vault), Secret(passphrase=password.encode()))
    encoder = BlobEncoder(opened.crypto, opened.config.compression_level, OTHER_CHUNK, probe=False)
    packer = Packer(opened)
    noise = bytearray(os.urandom(OTHER_CHUNK))
    for k in range(count):
        noise[:8] = k.to_bytes(8, "little")  # distinct chunks, or they would be stored once
        cid = opened.crypto.chunk_id(noise)
        packer.add(cid, encoder.encode(noise, cid), OTHER_CHUNK)
    packer.flush()


def same_content(a: Path, b: Path) -> bool:
    """Compare two sparse images by their data segments only (reading a terabyte of holes takes minutes)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        for fx, fy in ((fa, fb), (fb, fa)):
            for start, end in imagegen.data_segments(fx.fileno(), os.fstat(fx.fileno()).st_size):
                for off in range(start, end, 1 << 20):
                    n = min(1 << 20, end - off)
                    if os.pread(fx.fileno(), n, off) != os.pread(fy.fileno(), n, off):
                        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1T")
    p.add_argument("--vault-chunks", type=int, default=1_000_000,
                   help="chunks of other disks the vault already indexes (default: 1 TiB of them)")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-large")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "large-disk.json")
    args = p.parse_args()
    size = imagegen.parse_size(args.size)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image, vault, out = work / "disk.img", work / "vault", work / "restored.img"
    step = size // REGIONS
    with open(image, "wb") as f:
        f.truncate(size)
        for k in range(REGIONS):
            f.seek(k * step + 4096)
            f.write(os.urandom(REGION))
    changed = [[k * step + 4096 + 7 * 4096, 8192] for k in range(REGIONS)]
    extents = work / "changed.json"
    extents.write_text(json.dumps(changed))
    env = {**os.environ, "RAKSHA_PASSWORD": "bench"}
    subprocess.run([str(RAKSHA), "vault", "init", str(vault), "--encrypt"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    index_other_chunks(vault, args.vault_chunks, env["RAKSHA_PASSWORD"])

    def change() -> None:  # between the full and the incremental: what the extents say changed
        with open(image, "r+b") as f:
            for off, n in changed:
                f.seek(off)
                f.write(os.urandom(n))

    phases = {
        "full": [str(RAKSHA), "vault", "backup", str(vault), str(image), "--id", "big/r1/vm/vda"],
        "incremental": [str(RAKSHA), "vault", "backup", str(vault), str(image), "--id", "big/r2/vm/vda",
                        "--parent", "big/r1/vm/vda", "--changed-extents", str(extents)],
        "restore": [str(RAKSHA), "vault", "restore", str(vault), "big/r2/vm/vda", str(out)],
        "verify": [str(RAKSHA), "vault", "verify", str(vault)],
        "list": [str(RAKSHA), "vault", "list", str(vault)],
        # The other disks' chunks belong to no backup: a gc deletes them all, as after a large prune.
        "gc": [str(RAKSHA), "vault", "gc", str(vault), "--grace", "0s"],
    }
    results: dict[str, dict[str, float]] = {}
    for name, argv in phases.items():
        if name == "incremental":
            change()
        seconds, rss = measured(argv, env)
        results[name] = {"seconds": seconds, "peak_rss_bytes": rss}
    identical = same_content(image, out)
    print(f"disk {size / 2**40:.2f} TiB virtual, {REGIONS} x {REGION >> 20} MiB of data, in a vault already "
          f"indexing {args.vault_chunks:,} chunks; restored image {'identical' if identical else 'DIFFERS'}")
    for name, r in results.items():
        mb = r["peak_rss_bytes"] / 1e6
        print(f"  {name:12s} {r['seconds']:6.2f} s  peak RSS {mb:6.1f} MB  target {TARGET_MB:.0f} MB  "
              f"{'PASS' if mb <= TARGET_MB else 'MISS'}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size": size, "vault_chunks": args.vault_chunks, "identical": identical,
                                         "target_mb": TARGET_MB, "phases": results}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
