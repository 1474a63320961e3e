"""Incrementals of a disk that writes the same blocks before every backup (a journal, a database's hot pages).

bench/run.py's incremental is the first after a full: each changed chunk gets its first delta layer. A disk
whose writes land on the same blocks again and again stacks layers on the same chunks run after run;
at the bound on layers (format.md §8.1) they are merged with the change into one layer, so every
incremental still costs what changed (it rebuilt ~200 whole chunks every fourth run before). This makes
bench/run.py's base image (--size, default 2 GiB) and its 1% of changed extents, backs it up (full,
encrypted vault, through the engine API with the vault open, as the service's agent runs it), then
--runs times rewrites those extents with new data and backs up an incremental from them, each timed
with its sync on a cold page cache. Two patterns, each on a vault of its own: ``same`` writes the same
extents every run (each new layer replaces the last: nothing of the vault is read), ``drift`` moves
them 4 KiB further every run (layers overlap without covering each other: they stack up to the bound,
then merge). Restores each pattern's last point, compares it with the disk, verifies the vault. Prints
a table per run against the incremental target (<= 5% of the full) and writes
bench/results/hot-blocks.json.

    .venv/bin/python bench/hot_blocks.py [--size 2G] [--runs 12] [--pattern same,drift] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import imagegen  # noqa: E402
from large_disk import same_content  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.backup import BackupResult, backup_disk  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.keys import Secret  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.operations.verify import verify_vault  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402
from raksha.vault.sources.open import open_source  # noqa: E402
from run import DROP_CACHES, settle  # noqa: E402

CACHE = "cold" if os.access(DROP_CACHES, os.W_OK) else "warm"
TARGET_PCT = 5.0
DRIFT = 4096


def timed_backup(vault: Vault, image: Path, run: int, extents: list[list[int]] | None) -> tuple[float, BackupResult]:
    source = open_source(str(image))
    try:
        settle(CACHE)
        start = time.perf_counter()
        result = backup_disk(vault, source, BackupId.parse(f"hot/run{run}/vm1/vda"),
                             parent=BackupId.parse(f"hot/run{run - 1}/vm1/vda") if run else None,
                             changed_extents=[(o, n) for o, n in extents] if extents is not None else None)
        os.sync()
        return time.perf_counter() - start, result
    finally:
        source.close()


def run_pattern(work: Path, disk: Path, extents: list[list[int]], pattern: str, runs: int,
                seed: int) -> dict[str, Any]:
    size = os.stat(disk).st_size
    vault = Vault.init(LocalBackend(work / f"vault-{pattern}", create=True), VaultConfig.new(encrypted=True),
                       Secret(passphrase=b"bench"))
    full_seconds, full = timed_backup(vault, disk, 0, None)
    print(f"\n== {pattern}: full {full_seconds:.2f} s, {full.stats.bytes_stored / 1e6:.1f} MB stored; "
          f"{len(extents)} extents rewritten before each incremental"
          + (f", {DRIFT // 1024} KiB further each run" if pattern == "drift" else ""), flush=True)
    print(f"{'run':>4} {'seconds':>8} {'% full':>7} {'read MB':>8} {'stored MB':>10} {'layered':>8} {'merged':>7} "
          f"{'rebuilt':>8}")
    rows: list[dict[str, Any]] = []
    changed = 0
    for run in range(1, runs + 1):
        shift = run * DRIFT if pattern == "drift" else 0
        now = [[o + shift, min(n, size - o - shift)] for o, n in extents if o + shift < size]
        changed += sum(n for _, n in now)
        imagegen.write_changes(disk, now, seed + run, "hot")
        seconds, result = timed_backup(vault, disk, run, now)
        s = result.stats
        row = {"run": run, "seconds": round(seconds, 4), "pct_of_full": round(100 * seconds / full_seconds, 2),
               "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored, "chunks_delta": s.chunks_delta,
               "chunks_merged": s.chunks_merged, "chunks_patched": s.chunks_patched}
        rows.append(row)
        print(f"{run:>4} {seconds:>8.3f} {row['pct_of_full']:>6.1f}% {s.bytes_read / 1e6:>8.1f} "
              f"{s.bytes_stored / 1e6:>10.1f} {s.chunks_delta:>8} {s.chunks_merged:>7} {s.chunks_patched:>8}",
              flush=True)

    out = work / "restored.img"
    settle(CACHE)
    start = time.perf_counter()
    restore_backup(vault, BackupId.parse(f"hot/run{runs}/vm1/vda"), str(out))
    os.sync()
    restore_seconds = time.perf_counter() - start
    identical = same_content(out, disk)
    out.unlink()
    report = verify_vault(vault)
    worst = max(r["pct_of_full"] for r in rows)
    mean = sum(r["pct_of_full"] for r in rows) / len(rows)
    stored = sum(r["bytes_stored"] for r in rows)
    print(f"restore of run {runs}: {restore_seconds:.2f} s, {'identical' if identical else 'DIFFERENT'}; "
          f"verify: {'ok' if report.ok else 'DAMAGED'}")
    print(f"incremental % of full: mean {mean:.1f}%, worst {worst:.1f}% (target <= {TARGET_PCT:.0f}%: "
          f"{'PASS' if worst <= TARGET_PCT else 'MISS'}); chunks rebuilt whole: "
          f"{sum(r['chunks_patched'] for r in rows)}, merged: {sum(r['chunks_merged'] for r in rows)}; "
          f"stored {stored / 1e6:.1f} MB for {changed / 1e6:.1f} MB changed", flush=True)
    return {"full_seconds": round(full_seconds, 3), "runs": rows,
            "incremental_pct_of_full": {"mean": round(mean, 2), "worst": worst, "target": TARGET_PCT},
            "changed_bytes": changed, "stored_bytes": stored, "restore_seconds": round(restore_seconds, 3),
            "restore_identical": identical, "verify_ok": report.ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="2G")
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--pattern", default="same,drift", help="comma-separated: same, drift")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-hot")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "hot-blocks.json")
    p.add_argument("--keep", action="store_true", help="keep --workdir (the image and the vaults) at the end")
    args = p.parse_args()
    patterns = [x for x in args.pattern.split(",") if x]
    if not patterns or set(patterns) - {"same", "drift"}:
        p.error("--pattern takes same and/or drift")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "base.img"
    size = imagegen.parse_size(args.size)
    print(f"generating a {size} byte image and its changed extents in {work} ...", flush=True)
    imagegen.generate_image(base, size, args.seed)
    results: dict[str, Any] = {"size": size}
    for pattern in patterns:
        disk = work / f"{pattern}.img"
        extents = imagegen.make_changed_copy(base, disk, seed=args.seed)  # the first run's writes are its own
        results["extents"] = len(extents)
        results[pattern] = run_pattern(work, disk, extents, pattern, args.runs, args.seed)
        disk.unlink()
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    if not args.keep:
        shutil.rmtree(work)
    ok = all(results[x]["restore_identical"] and results[x]["verify_ok"] for x in patterns)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
