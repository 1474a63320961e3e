#!/usr/bin/env python3
"""The main job on the embedded default, as `make demo` runs it.

Generates a VM-like disk image, backs it up (full) into an encrypted local
vault, changes 1% of it, backs it up again incrementally from the changed
extents, restores both points, proves them bit-exact against the originals
and prints what happened. Everything goes through the real `raksha` CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import imagegen  # noqa: E402

RAKSHA = str(Path(sys.executable).parent / "raksha")


def file_digest(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def disk_usage(path: Path) -> int:
    """Bytes really allocated (sparse files count only their data)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


def run(step: str, *args: str, env: dict[str, str]) -> tuple[dict, float]:
    start = time.monotonic()
    print(f"\n$ raksha {' '.join(args)}", flush=True)
    progress = ["--progress", "lines"] if args[1] in ("backup", "restore", "verify") else []
    proc = subprocess.run([RAKSHA, *args, "--json", *progress], env=env, stdout=subprocess.PIPE,
                          text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        print(proc.stdout, file=sys.stderr)
        sys.exit(f"demo: step '{step}' failed with exit status {proc.returncode}")
    return json.loads(proc.stdout), elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="virtual size of the generated disk (default 1G)")
    parser.add_argument("--workdir", default=str(ROOT / "demo-work"), help="scratch directory (wiped)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = imagegen.parse_size(args.size)
    base, changed, vault = work / "vda-monday.img", work / "vda-tuesday.img", work / "vault"
    env = dict(os.environ)
    (work / "passphrase").write_text("demo passphrase\n")
    env["RAKSHA_PASSWORD_FILE"] = str(work / "passphrase")

    print(f"demo: generating a {args.size} VM-like disk (holes, OS-like files, incompressible data)")
    t = time.monotonic()
    imagegen.generate_image(base, size, seed=1)
    extents = imagegen.make_changed_copy(base, changed, fraction=0.01, seed=2)
    imagegen.write_extents(changed, extents)
    changed_bytes = sum(length for _, length in extents)
    print(f"demo: images ready in {time.monotonic() - t:.1f} s; Tuesday's copy differs in {len(extents)} extents "
          f"({changed_bytes / 2**20:.1f} MiB)")

    run("init", "vault", "init", str(vault), "--encrypt", env=env)
    full, t_full = run("full backup", "vault", "backup", str(vault), str(base), "--id", "demo/monday/vm1/vda", env=env)
    size_after_full = disk_usage(vault)
    incr, t_incr = run("incremental backup", "vault", "backup", str(vault), str(changed), "--id",
                       "demo/tuesday/vm1/vda", "--parent", "demo/monday/vm1/vda", "--changed-extents",
                       str(imagegen.extents_json_path(changed)), env=env)
    size_after_incr = disk_usage(vault)
    restored = {}
    timings = {}
    for bid, out, fmt in (("demo/monday/vm1/vda", work / "restored-monday.raw", "raw"),
                          ("demo/tuesday/vm1/vda", work / "restored-tuesday.qcow2", "qcow2")):
        res, timings[bid] = run(f"restore {bid}", "vault", "restore", str(vault), bid, str(out), "--format", fmt,
                                env=env)
        restored[bid] = (out, fmt, res)
    verify, t_verify = run("verify", "vault", "verify", str(vault), env=env)

    print("\ndemo: checking the restored disks bit for bit against the originals")
    ok = True
    for bid, original in (("demo/monday/vm1/vda", base), ("demo/tuesday/vm1/vda", changed)):
        out, fmt, _ = restored[bid]
        if fmt == "qcow2":
            same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(original), str(out)]
                                  ).returncode == 0
        else:
            same = file_digest(original) == file_digest(out)
        print(f"  {bid} -> {out.name} ({fmt}): {'identical' if same else 'DIFFERENT'}")
        ok &= same

    mb = 1e6
    print("\n=== Raksha demo summary ===")
    print(f"disk: {size / 2**30:.2f} GiB virtual, {disk_usage(base) / 2**20:.0f} MiB allocated")
    print(f"full backup:        {t_full:6.2f} s  read {full['bytes_read'] / 2**20:7.1f} MiB "
          f"({full['read_mb_s']:.0f} MB/s)  stored {full['bytes_stored'] / 2**20:7.1f} MiB  "
          f"[{full['chunks_zero']} zero chunks skipped]")
    print(f"incremental backup: {t_incr:6.2f} s  read {incr['bytes_read'] / 2**20:7.1f} MiB of "
          f"{changed_bytes / 2**20:.1f} MiB changed  stored {incr['bytes_stored'] / 2**20:7.1f} MiB  "
          f"[{incr['chunks_from_parent']} chunks reused from the parent unread]")
    print(f"vault on disk: {size_after_full / 2**20:.1f} MiB after the full, {size_after_incr / 2**20:.1f} MiB "
          f"after both (two full points for {(size_after_incr - size_after_full) / 2**20:.1f} MiB more)")
    for bid, (out, _fmt, res) in restored.items():
        print(f"restore {bid:22s} {timings[bid]:6.2f} s  {res['virtual_size'] / mb / max(res['seconds'], 1e-9):.0f} "
              f"MB/s  {res['chunks_verified']} chunks verified  -> {out.name}")
    print(f"verify: {'no damage' if verify['ok'] else 'DAMAGE'}; {verify['chunks_checked']} chunks re-hashed "
          f"in {t_verify:.2f} s")
    print(f"result: {'both points restored bit-exact' if ok else 'MISMATCH'}; encrypted vault at {vault}")
    if not args.keep and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
