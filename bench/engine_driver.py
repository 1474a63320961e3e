"""Raksha through its engine API, in a process that has already opened the vault.

The long-running agent unlocks the vault key once and then runs backups in-process, so neither the
interpreter start nor the Argon2id key derivation is paid per backup there. This driver measures
that case for bench/run.py, honestly labelled as such:

  untimed  import Raksha, open the vault (key derivation), open the source, read the extents file,
           then (cold mode) sync and drop the page cache
  timed    backup_disk(...) from the call to its return, plus os.sync()

and prints one JSON object: seconds, the process CPU seconds of the timed part, peak RSS and the
engine's own report. The vault is the bench's own (a copy made just after the full, so this
incremental does exactly the work the CLI incremental did) or a fresh one for the full.

``--warm-up`` (bench/run.py passes it): before the timed part, also untimed, one backup of a small
generated image into a scratch vault of the same chunk size and encryption, deleted at once. The agent
has run backups before the one measured, and the engine keeps a backup's buffers for the next one of
the process (``raksha.vault.malloc.POOL``); without it every backup measured here would be the
process's first and fault its ~28 MiB of buffers in afresh (15-20 ms of CPU of a 20 MB incremental).

    python bench/engine_driver.py VAULT IMAGE --id ID [--parent ID --changed-extents FILE]
                                  [--init] [--cache cold|warm] [--warm-up]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.keys import Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.open import open_source

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def warm_up(config: VaultConfig, size: int = 24 << 20) -> None:
    """One backup (half compressible, half random data) into a scratch vault like ``config``, then gone."""
    with tempfile.TemporaryDirectory(prefix="raksha-warm-up-") as tmp:
        image = Path(tmp) / "warm-up.img"
        with open(image, "wb") as f:
            for i in range(size >> 20):
                f.write(os.urandom(1 << 20) if i % 2 else os.urandom(4096) * 256)
        secret = Secret(keyfile=os.urandom(32)) if config.encrypted else None
        scratch = Vault.init(LocalBackend(Path(tmp) / "vault", create=True),
                             VaultConfig.new(chunk_size=config.chunk_size, encrypted=config.encrypted), secret)
        source = open_source(str(image))
        try:
            backup_disk(scratch, source, BackupId.parse("warm/up/vm/vda"))
        finally:
            source.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vault", type=Path)
    p.add_argument("image")
    p.add_argument("--id", required=True)
    p.add_argument("--parent")
    p.add_argument("--changed-extents", type=Path)
    p.add_argument("--init", action="store_true", help="create the (encrypted) vault first, untimed")
    p.add_argument("--cache", choices=["cold", "warm"], default="warm")
    p.add_argument("--warm-up", action="store_true",
                   help="first back up a small image into a scratch vault, untimed, as the agent's earlier backups")
    args = p.parse_args(argv)

    password = os.environ["RAKSHA_PASSWORD"].encode()
    secret = Secret(passphrase=password)
    if args.init:
        vault = Vault.init(LocalBackend(args.vault, create=True), VaultConfig.new(encrypted=True), secret)
    else:
        vault = Vault.open(LocalBackend(args.vault), secret)
    if args.warm_up:
        warm_up(vault.config)
    source = open_source(args.image)
    extents = None
    if args.changed_extents is not None:
        extents = [(int(o), int(n)) for o, n in json.loads(args.changed_extents.read_text())]
    os.sync()
    if args.cache == "cold":
        DROP_CACHES.write_text("3\n")

    start, cpu = time.perf_counter(), cpu_seconds()
    result = backup_disk(vault, source, BackupId.parse(args.id),
                         parent=BackupId.parse(args.parent) if args.parent else None, changed_extents=extents)
    os.sync()  # timed: done when the data is on disk, as for every CLI command
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu

    source.close()
    report = result.to_dict()
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "report": report,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
