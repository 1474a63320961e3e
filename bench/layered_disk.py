"""Peak RSS when a large disk's manifest carries delta layers on many chunks (issue 3: "peak RSS <= 150 MB at
any image size").

A chunk changed in part is stored as a delta layer on its parent's chunk (ADR 0011), up to half of a disk's
chunks. A database's disk takes scattered small writes everywhere, so after a few incrementals without a
full a large disk's manifest holds layers on hundreds of thousands of chunks, which every later
incremental, restore and verify loads. This makes a sparse image of --size (default 1 TiB), backs it up
(encrypted vault, CLI, default key derivation), writes 4 KiB of distinct data into --layered chunks
(default: half of them, the policy's most), backs up an incremental of exactly those extents (each chunk
gets a layer), writes 16 more small extents and backs up a second incremental on top (it loads and carries
the parent's layers), restores the second incremental and compares it with the image, verifies the
vault and runs a gc on it. Prints a table against the target and writes bench/results/layered-disk.json.

    .venv/bin/python bench/layered_disk.py [--size 1T] [--layered N] [--workdir DIR]
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
from large_disk import RAKSHA, TARGET_MB, measured, same_content  # noqa: E402

CHUNK = 1 << 20
PIECE = 4096


def write_pieces(image: Path, offsets: list[int], tag: bytes) -> None:
    """4 KiB of distinct data at each offset (distinct: identical pieces would be stored once)."""
    base = os.urandom(PIECE)
    with open(image, "r+b") as f:
        fd = f.fileno()
        for k, off in enumerate(offsets):
            os.pwrite(fd, tag + k.to_bytes(8, "little") + base[len(tag) + 8 :], off)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1T")
    p.add_argument("--layered", type=int, help="chunks given a layer by the first incremental (default: half)")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-layered")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "layered-disk.json")
    p.add_argument("--backups-only", action="store_true",
                   help="stop after the two incrementals (no restore, verify or comparison)")
    p.add_argument("--keep", action="store_true", help="keep --workdir (the image and the vault) at the end")
    args = p.parse_args()
    size = imagegen.parse_size(args.size)
    chunks = size // CHUNK
    layered = args.layered if args.layered is not None else chunks // 2
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image, vault, out = work / "disk.img", work / "vault", work / "restored.img"
    with open(image, "wb") as f:
        f.truncate(size)
    step = chunks // layered
    first = [k * step * CHUNK + 8192 for k in range(layered)]  # inside every step-th chunk
    second = [k * (chunks // 16) * CHUNK + 65536 for k in range(16)]
    (work / "first.json").write_text(json.dumps([[off, PIECE] for off in first]))
    (work / "second.json").write_text(json.dumps([[off, PIECE] for off in second]))
    env = {**os.environ, "RAKSHA_PASSWORD": "bench"}
    subprocess.run([str(RAKSHA), "vault", "init", str(vault), "--encrypt"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    backup = [str(RAKSHA), "vault", "backup", str(vault), str(image)]
    phases = {
        "full": [*backup, "--id", "db/r1/vm/vda"],
        "incremental (layers)": [*backup, "--id", "db/r2/vm/vda", "--parent", "db/r1/vm/vda",
                                 "--changed-extents", str(work / "first.json")],
        "incremental on it": [*backup, "--id", "db/r3/vm/vda", "--parent", "db/r2/vm/vda",
                              "--changed-extents", str(work / "second.json")],
        "restore": [str(RAKSHA), "vault", "restore", str(vault), "db/r3/vm/vda", str(out)],
        "verify": [str(RAKSHA), "vault", "verify", str(vault)],
        # Everything is referenced: a whole mark of every manifest and index object, nothing to sweep.
        "gc": [str(RAKSHA), "vault", "gc", str(vault), "--grace", "0"],
    }
    results: dict[str, dict[str, float]] = {}
    if args.backups_only:
        del phases["restore"], phases["verify"], phases["gc"]
    for name, argv in phases.items():
        if name == "incremental (layers)":
            write_pieces(image, first, b"first")
        elif name == "incremental on it":
            write_pieces(image, second, b"second")
        seconds, rss = measured(argv, env)
        results[name] = {"seconds": seconds, "peak_rss_bytes": rss}
        print(f"  {name:22s} {seconds:7.2f} s  peak RSS {rss / 1e6:6.1f} MB  target {TARGET_MB:.0f} MB  "
              f"{'PASS' if rss / 1e6 <= TARGET_MB else 'MISS'}", flush=True)
    identical = same_content(image, out) if not args.backups_only else None
    print(f"disk {size / 2**40:.2f} TiB virtual ({chunks:,} chunks of 1 MiB), {layered:,} of them given a "
          f"delta layer; restored image {'not made' if identical is None else 'identical' if identical else 'DIFFERS'}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"size": size, "layered_chunks": layered, "identical": identical,
                                         "target_mb": TARGET_MB, "phases": results}, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical is not False else 1


if __name__ == "__main__":
    sys.exit(main())
