#!/usr/bin/env python3
"""Create the golden version-1 vaults in tests/fixtures/golden-v1/ (run once; the result is committed).

Every future Raksha must read these vaults: tests/unit/test_golden.py restores each backup
and compares it with the BLAKE3 recorded in expected.json. Never regenerate them to make that
test pass; a vault written by an older Raksha is exactly what the test is about. The script
refuses to touch existing fixtures unless given --force (only for a new format version's
fixtures, in a new directory, or before the first commit).

Inputs are deterministic (patterns, BLAKE3 XOF bytes); the vaults themselves are not (vault
ids, keys, nonces, timestamps), which is fine: the recorded hashes are of the restored disks.

What the vaults hold (chunk size 64 KiB, packs of about 64 KiB, so a backup spans several packs):

- ``golden/run1/vm1/vda``: a 3 MiB disk: compressible text chunks, an incompressible chunk
  (stored raw, not zstd), holes, a chunk of written zeros, a chunk repeated inside the disk;
- ``golden/run2/vm1/vda``: an incremental of it from changed extents (one lands in a hole);
- ``golden/run1/vm2/vdb``: another VM's small disk whose size is not a multiple of the chunk
  size, sharing a chunk with vm1;
- plain vault only: a backup deleted before a gc consolidated the index and repacked its
  pack, and the index that gc superseded put back (as if the gc had been killed before
  deleting it): readers must ignore superseded indexes that are still present;
- encrypted vault only (passphrase "golden", Argon2id with 8 MiB): a second key, a key file.

Usage: .venv/bin/python scripts/make-golden-vault.py [--out tests/fixtures/golden-v1] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import blake3

from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.index import decode_index
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault
from raksha.vault.sources.raw import RawSource

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 << 10
PACK_SIZE = 64 << 10
PASSPHRASE = "golden"
KEYFILE = "golden.keyfile"
MAX_TOTAL = 1 << 20

FULL = "golden/run1/vm1/vda"
INC = "golden/run2/vm1/vda"
VM2 = "golden/run1/vm2/vdb"
GONE = "golden/run0/vm0/vda"
INC_EXTENTS = [[2 * CHUNK + 4096, 4096], [12 * CHUNK, 4096], [20 * CHUNK, 8192], [47 * CHUNK + 61440, 4096]]


def text_chunk(n: int, length: int = CHUNK) -> bytes:
    """A compressible, unique chunk: numbered lines of text."""
    lines = b"".join(f"raksha golden v1 chunk {n:04d} line {i:05d} the quick brown fox\n".encode()
                     for i in range(length // 40 + 1))
    return lines[:length]


def random_bytes(label: str, length: int = CHUNK) -> bytes:
    return blake3.blake3(f"raksha golden v1 {label}".encode()).digest(length=length)


def write_image(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    """A sparse raw image of ``size`` bytes with ``chunks`` (index -> bytes) written at chunk offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, data in sorted(chunks.items()):
            f.seek(i * CHUNK)
            f.write(data)


def make_images(work: Path) -> dict[str, Path]:
    base: dict[int, bytes] = {i: text_chunk(i) for i in range(48) if not 11 <= i <= 15}
    base[10] = random_bytes("chunk 10")  # incompressible: stored as a raw blob
    base[16] = base[3]  # the same content twice in one disk
    base[41] = bytes(CHUNK)  # written zeros, not a hole: still the zero id
    base[47] = text_chunk(47, 40000)  # the tail of the last chunk stays zero
    write_image(work / "vm1-v1.img", 48 * CHUNK, base)

    changed = dict(base)
    for off, length in INC_EXTENTS:
        i, at = divmod(off, CHUNK)
        chunk = bytearray(changed.get(i, bytes(CHUNK)))
        chunk[at : at + length] = random_bytes(f"change {off}", length)
        changed[i] = bytes(chunk)
    write_image(work / "vm1-v2.img", 48 * CHUNK, changed)

    vm2_size = 3 * CHUNK + 8704  # not a multiple of the chunk size: a short last chunk
    vm2 = {0: base[5], 1: text_chunk(1001), 3: text_chunk(1003, 8704)}
    write_image(work / "vm2.img", vm2_size, vm2)

    gone = {0: base[0], 1: base[1], 2: random_bytes("gone 2"), 3: random_bytes("gone 3"), 4: random_bytes("gone 4")}
    write_image(work / "gone.img", 5 * CHUNK, gone)
    return {FULL: work / "vm1-v1.img", INC: work / "vm1-v2.img", VM2: work / "vm2.img", GONE: work / "gone.img"}


def backup(vault: Vault, image: Path, backup_id: str, parent: str | None = None,
           extents: list[list[int]] | None = None) -> None:
    source = RawSource(str(image))
    try:
        backup_disk(vault, source, BackupId.parse(backup_id), parent=BackupId.parse(parent) if parent else None,
                    changed_extents=[(o, n) for o, n in extents] if extents is not None else None, threads=1,
                    hints={"fixture": "golden-v1"})
    finally:
        source.close()


def file_hash(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def make_vault(root: Path, images: dict[str, Path], *, encrypted: bool, keyfile: bytes | None) -> dict[str, object]:
    config = VaultConfig.new(chunk_size=CHUNK, pack_size=PACK_SIZE, compression_level=3, encrypted=encrypted)
    secret = Secret(passphrase=PASSPHRASE.encode()) if encrypted else None
    kdf = KdfParams(memory_kib=8192)
    vault = Vault.init(LocalBackend(root, create=True), config, secret, kdf)
    if keyfile is not None:
        vault.add_key(Secret(keyfile=keyfile))

    if not encrypted:
        backup(vault, images[GONE], GONE)  # FULL will share two of its chunks
    backup(vault, images[FULL], FULL)
    backup(vault, images[INC], INC, parent=FULL, extents=INC_EXTENTS)
    backup(vault, images[VM2], VM2)

    superseded_left = None
    if not encrypted:
        saved = {p.name: p.read_bytes() for p in (root / "index").iterdir()}
        vault.delete_backup(BackupId.parse(GONE))
        report = collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
        assert report.packs_repacked >= 1, report  # GONE's pack held live chunks and garbage
        # The shape a gc killed between its consolidated index and its last deletes leaves: an index
        # superseding the old ones, and an old one still present that points at a pack now gone.
        # Readers must ignore it (format.md §7).
        stale = [name for name, data in sorted(saved.items())
                 if any(not (root / pack_key(loc.pack_id.hex())).exists()
                        for loc in decode_index(data, vault.crypto, what=name).entries.values())]
        assert stale, "gc deleted no pack that an old index names"
        vault.write_index(vault.load_index().locations, [bytes.fromhex(name) for name in sorted(saved)])
        superseded_left = stale[0]
        (root / "index" / superseded_left).write_bytes(saved[superseded_left])

    out: dict[str, object] = {"encrypted": encrypted, "chunk_size": CHUNK, "vault_id": config.vault_id,
                              "backups": {}}
    if encrypted:
        out.update(passphrase=PASSPHRASE, keyfile=KEYFILE)
    if superseded_left:
        out["superseded_index_left"] = superseded_left
    report = verify_vault(vault, threads=1)
    assert report.ok, report.summary()
    with tempfile.TemporaryDirectory() as tmp:
        for bid in vault.backup_ids():
            restored = Path(tmp) / "restored.img"
            result = restore_backup(vault, bid, str(restored), threads=1)
            digest = file_hash(restored)
            assert digest == file_hash(images[str(bid)]), f"{bid} does not restore to its image"
            meta = vault.read_metadata(bid)
            out["backups"][str(bid)] = {  # type: ignore[index]
                "blake3": digest, "virtual_size": result.virtual_size, "content_digest": result.content_digest,
                "kind": meta["kind"], "parent": meta["parent"],
            }
            restored.unlink()
    for leftover in ("tmp", "locks"):
        path = root / leftover
        if path.exists():
            assert not any(path.iterdir()), f"{path} is not empty"
            path.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "golden-v1")
    parser.add_argument("--force", action="store_true", help="replace existing fixtures (see above: almost never)")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print(f"{out} exists: golden vaults are never regenerated (use --force only for new fixtures)",
                  file=sys.stderr)
            return 1
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    keyfile = blake3.blake3(b"raksha golden v1 key file").digest(length=64)
    (out / KEYFILE).write_bytes(keyfile)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp))
        expected = {
            "format_version": 1,
            "generated_by": "scripts/make-golden-vault.py",
            "vaults": {
                "plain": make_vault(out / "plain", images, encrypted=False, keyfile=None),
                "encrypted": make_vault(out / "encrypted", images, encrypted=True, keyfile=keyfile),
            },
        }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if total > MAX_TOTAL:
        print(f"{out}: {total} bytes, more than {MAX_TOTAL}: shrink the inputs", file=sys.stderr)
        return 1
    print(f"wrote {out} ({total} bytes, {sum(1 for p in out.rglob('*') if p.is_file())} files)")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
