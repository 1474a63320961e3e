#!/usr/bin/env python3
"""Create the golden vaults of a format version in tests/fixtures/golden-v<N>/ (run once; the result is committed).

Every future Raksha must read these vaults: tests/unit/test_golden.py restores each backup
and compares it with the BLAKE3 recorded in expected.json. Never regenerate them to make that
test pass; a vault written by an older Raksha is exactly what the test is about. The script
refuses to touch existing fixtures unless given --force (only for a new format version's
fixtures, in a new directory, or before the first commit).

Inputs are deterministic (patterns, BLAKE3 XOF bytes); the vaults themselves are not (vault
ids, keys, nonces, timestamps), which is fine: the recorded hashes are of the restored disks.

Both versions hold a ``plain`` and an ``encrypted`` vault (passphrase "golden", Argon2id with
8 MiB, and a second key: a key file), chunk size 64 KiB, packs of about 64 KiB, so a backup
spans several packs.

``--format 1`` (tests/fixtures/golden-v1/, version-1 manifests):

- ``golden/run1/vm1/vda``: a 3 MiB disk: compressible text chunks, an incompressible chunk
  (stored raw, not zstd), holes, a chunk of written zeros, a chunk repeated inside the disk;
- ``golden/run2/vm1/vda``: an incremental of it from changed extents (one lands in a hole);
- ``golden/run1/vm2/vdb``: another VM's small disk whose size is not a multiple of the chunk
  size, sharing a chunk with vm1;
- plain vault only: a backup deleted before a gc consolidated the index and repacked its
  pack, and the index that gc superseded put back (as if the gc had been killed before
  deleting it): readers must ignore superseded indexes that are still present.

They were written by a Raksha without deltas; today's engine would write the incremental as a
version-2 manifest, so rerunning ``--format 1`` (elsewhere) reproduces the restored disks, not
the manifests.

``--format 2`` (tests/fixtures/golden-v2/, manifests with deltas, format.md §8.1), every
incremental made by the real engine from the extents written since its parent:

- ``golden/run1/vm1/vda``: a full (a version-1 manifest) of a disk of 10 chunks and a short
  last one, with a hole (chunk 4) and written zeros (chunk 6);
- ``golden/run2..6/vm1/vda``: incrementals (version 2): chunk 1 gains a layer in each of runs
  2-5 (up to MAX_LAYERS, layers overlapping: newer bytes win) and is rebuilt whole in run 6
  (see below);
  an extent across chunks 2 and 3 (a layer on each); a layer on the hole (a base of zeros); a
  layer of two ranges (chunk 5); a layer ending at the end of the short last chunk; a layer of
  written zeros (the zero id, not stored) with a later layer over it (chunk 7); more than half
  of chunk 9 changed (rebuilt whole); untouched chunks inherit their parent's layers;
- ``golden/run1..2/vm2/vdb``: another VM's full and an incremental with a layer and a chunk
  rebuilt whole; in the plain vault the full is deleted and a gc run: the incremental's bases
  and layers outlive the backup that wrote them.

The committed golden-v2 was written before the engine merged layers: its run 6 rebuilt chunk 1
whole. Today's engine merges chunk 1's four layers and the change into one layer instead (a
layer like any other to a reader), so rerunning ``--format 2`` (elsewhere) writes that.

Usage: .venv/bin/python scripts/make-golden-vault.py [--format 1|2] [--out tests/fixtures/golden-v<N>] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import blake3

from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import BackupResult, backup_disk
from raksha.vault.engine.layering import MAX_LAYERS
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.deltas import Layer
from raksha.vault.format.index import decode_index
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.manifest import Manifest
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
# What INC really changed, given as its changed extents: the change meant for 47 * CHUNK + 61440 landed at
# 40000 (chunk 47 holds 40000 bytes, and a bytearray slice past its end appends). The Raksha that wrote the
# golden-v1 vaults read changed chunks whole, so it did not matter; the images are kept as they were.
INC_CHANGED = [*INC_EXTENTS[:3], [47 * CHUNK + 40000, 4096]]


def text_chunk(n: int, length: int = CHUNK, tag: str = "v1") -> bytes:
    """A compressible, unique chunk: numbered lines of text."""
    lines = b"".join(f"raksha golden {tag} chunk {n:04d} line {i:05d} the quick brown fox\n".encode()
                     for i in range(length // 40 + 1))
    return lines[:length]


def random_bytes(label: str, length: int = CHUNK, tag: str = "v1") -> bytes:
    return blake3.blake3(f"raksha golden {tag} {label}".encode()).digest(length=length)


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
           extents: list[list[int]] | None = None, fixture: str = "golden-v1") -> BackupResult:
    source = RawSource(str(image))
    try:
        return backup_disk(vault, source, BackupId.parse(backup_id), parent=BackupId.parse(parent) if parent else None,
                           changed_extents=[(o, n) for o, n in extents] if extents is not None else None, threads=1,
                           hints={"fixture": fixture})
    finally:
        source.close()


def check_extents(parent: Path, image: Path, extents: list[list[int]]) -> None:
    """Outside ``extents``, ``image`` equals ``parent``: an incremental's extents name every byte that changed."""
    patched, want = bytearray(parent.read_bytes()), image.read_bytes()
    for off, n in extents:
        patched[off : off + n] = want[off : off + n]
    assert patched == want, f"{image} changed outside the extents given for it"


def file_hash(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def new_vault(root: Path, *, encrypted: bool, keyfile: bytes | None) -> Vault:
    config = VaultConfig.new(chunk_size=CHUNK, pack_size=PACK_SIZE, compression_level=3, encrypted=encrypted)
    secret = Secret(passphrase=PASSPHRASE.encode()) if encrypted else None
    vault = Vault.init(LocalBackend(root, create=True), config, secret, KdfParams(memory_kib=8192))
    if keyfile is not None:
        vault.add_key(Secret(keyfile=keyfile))
    return vault


def deltas_json(m: Manifest) -> dict[str, Any]:
    """A manifest's deltas as expected.json records them: chunk index -> its base and layers."""
    return {str(i): {"base": m.chunk_ids[i].hex(),
                     "layers": [{"blob": layer.blob_id.hex(), "ranges": [list(r) for r in layer.ranges]}
                                for layer in layers]}
            for i, layers in sorted(m.deltas.items())}


def describe(vault: Vault, root: Path, images: dict[str, Path], *, encrypted: bool,
             manifests: bool = False) -> dict[str, Any]:
    """Verify the vault, restore every backup and check it against its image; what expected.json records
    of the vault (with ``manifests``: each manifest's version and deltas too). Leaves no empty tmp/ or
    locks/ behind."""
    out: dict[str, Any] = {"encrypted": encrypted, "chunk_size": CHUNK, "vault_id": vault.config.vault_id,
                           "backups": {}}
    if encrypted:
        out.update(passphrase=PASSPHRASE, keyfile=KEYFILE)
    report = verify_vault(vault, threads=1)
    assert report.ok, report.summary()
    with tempfile.TemporaryDirectory() as tmp:
        for bid in vault.backup_ids():
            restored = Path(tmp) / "restored.img"
            result = restore_backup(vault, bid, str(restored), threads=1)
            digest = file_hash(restored)
            assert digest == file_hash(images[str(bid)]), f"{bid} does not restore to its image"
            meta = vault.read_metadata(bid)
            out["backups"][str(bid)] = {
                "blake3": digest, "virtual_size": result.virtual_size, "content_digest": result.content_digest,
                "kind": meta["kind"], "parent": meta["parent"],
            }
            if manifests:
                m = vault.read_manifest(bid)
                out["backups"][str(bid)].update(manifest_version=m.version, deltas=deltas_json(m))
            restored.unlink()
    for leftover in ("tmp", "locks"):
        path = root / leftover
        if path.exists():
            assert not any(path.iterdir()), f"{path} is not empty"
            path.rmdir()
    return out


def make_vault(root: Path, images: dict[str, Path], *, encrypted: bool, keyfile: bytes | None) -> dict[str, Any]:
    vault = new_vault(root, encrypted=encrypted, keyfile=keyfile)
    if not encrypted:
        backup(vault, images[GONE], GONE)  # FULL will share two of its chunks
    backup(vault, images[FULL], FULL)
    check_extents(images[FULL], images[INC], INC_CHANGED)
    backup(vault, images[INC], INC, parent=FULL, extents=INC_CHANGED)
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

    out = describe(vault, root, images, encrypted=encrypted)
    if superseded_left:
        out["superseded_index_left"] = superseded_left
    return out


# -- version 2: deltas (format.md §8.1) ------------------------------------------------------------

V2 = "v2"
V2_SIZE = 10 * CHUNK + 20000  # a short last chunk (chunk 10)
V2_VM2_SIZE = 3 * CHUNK

# What is written between a disk's backups: run -> (offset, length, "random" | "text" | "zeros").
# Run 1 is a full backup; run n an incremental of run n - 1 given exactly these extents.
V2_VM1_WRITES: dict[int, list[tuple[int, int, str]]] = {
    2: [(1 * CHUNK + 4096, 4096, "random"),  # chunk 1: a first layer
        (3 * CHUNK - 2048, 4096, "random"),  # across chunks 2 and 3: a layer on each
        (4 * CHUNK + 12288, 4096, "random"),  # chunk 4, a hole in run 1: a layer on a base of zeros
        (5 * CHUNK + 100, 300, "random"), (5 * CHUNK + 9000, 500, "random"),  # one layer of two ranges
        (10 * CHUNK + 19000, 1000, "random")],  # the short last chunk, up to its end
    3: [(1 * CHUNK + 6144, 4096, "random"),  # chunk 1: a second layer, overlapping the first
        (7 * CHUNK + 8192, 8192, "zeros")],  # a layer of zeros: the zero id, nothing stored
    4: [(1 * CHUNK, 5120, "text"),  # chunk 1: a third layer, overlapping the first
        (7 * CHUNK + 12288, 1024, "random")],  # chunk 7: a layer over part of the layer of zeros
    5: [(1 * CHUNK + 60000, 1000, "random")],  # chunk 1: a fourth layer, MAX_LAYERS
    6: [(1 * CHUNK + 30000, 1000, "random"),  # chunk 1: a fifth layer would be too many: merged into one
        (9 * CHUNK + 1000, 40000, "text")],  # more than half of chunk 9: rebuilt whole
}
V2_VM2_WRITES: dict[int, list[tuple[int, int, str]]] = {
    2: [(1000, 2000, "random"),  # a layer on chunk 0
        (CHUNK + 4096, 40000, "text")],  # chunk 1 rebuilt whole: the full's chunk 1 is garbage once it is gone
}


def v2_id(run: int, vm: int = 1) -> str:
    return f"golden/run{run}/vm{vm}/{'vda' if vm == 1 else 'vdb'}"


def v2_extents(writes: list[tuple[int, int, str]]) -> list[list[int]]:
    return [[off, n] for off, n, _ in writes]


def v2_chain(work: Path, vm: int, size: int, full: dict[int, bytes],
             writes: dict[int, list[tuple[int, int, str]]]) -> dict[str, Path]:
    """The image of each backup of a disk: the full's, then each run's writes applied to the one before."""
    images = {v2_id(1, vm): work / f"vm{vm}-run1.img"}
    write_image(images[v2_id(1, vm)], size, full)
    for run, changes in sorted(writes.items()):
        image = images[v2_id(run, vm)] = work / f"vm{vm}-run{run}.img"
        shutil.copyfile(images[v2_id(run - 1, vm)], image)
        with open(image, "r+b") as f:
            for k, (off, n, kind) in enumerate(changes):
                label = f"vm{vm} run{run} write {k}"
                data = {"zeros": bytes(n), "random": random_bytes(label, n, V2),
                        "text": text_chunk(1000 * vm + 10 * run + k, n, V2)}[kind]
                f.seek(off)
                f.write(data)
    return images


def v2_images(work: Path) -> dict[str, Path]:
    full = {i: text_chunk(i, tag=V2) for i in range(10) if i != 4}  # chunk 4 is a hole
    full[6] = bytes(CHUNK)  # written zeros: the zero id, as a hole
    full[10] = text_chunk(10, V2_SIZE - 10 * CHUNK, V2)
    vm2 = {i: text_chunk(100 + i, tag=V2) for i in range(3)}
    return {**v2_chain(work, 1, V2_SIZE, full, V2_VM1_WRITES), **v2_chain(work, 2, V2_VM2_SIZE, vm2, V2_VM2_WRITES)}


def overlap(a: Layer, b: Layer) -> bool:
    return any(o1 < o2 + n2 and o2 < o1 + n1 for o1, n1 in a.ranges for o2, n2 in b.ranges)


def check_v2_manifests(vault: Vault, results: dict[str, BackupResult]) -> None:
    """The vm1 chain's manifests are version 2 and hold every case this fixture is for."""
    m = {run: vault.read_manifest(BackupId.parse(v2_id(run))) for run in range(1, 7)}
    assert m[1].version == 1 and not m[1].deltas, "a full never writes deltas"
    assert all(m[run].version == 2 for run in range(2, 7))
    assert [len(m[run].deltas.get(1, ())) for run in range(1, 7)] == [0, 1, 2, 3, 4, 1], "chunk 1's layers"
    assert all(m[run].chunk_ids[1] == m[1].chunk_ids[1] for run in range(2, 7))  # the base stays
    six = results[v2_id(6)].stats
    assert (six.chunks_merged, six.chunks_patched) == (1, 1)  # chunk 1's layers merged, chunk 9 rebuilt whole
    assert m[6].deltas[1][0].ranges == ((0, 10240), (30000, 1000), (60000, 1000)) and 9 not in m[6].deltas
    assert m[6].chunk_ids[9] != m[5].chunk_ids[9]
    first, second, third, fourth = m[5].deltas[1]
    assert overlap(first, second) and overlap(first, third) and not overlap(first, fourth)
    assert m[2].deltas[2] == [Layer(m[2].deltas[2][0].blob_id, ((CHUNK - 2048, 2048),))]  # across 2 and 3
    assert m[2].deltas[3] == [Layer(m[2].deltas[3][0].blob_id, ((0, 2048),))]
    assert m[1].chunk_ids[4] == m[2].chunk_ids[4] == ZERO_ID and len(m[2].deltas[4]) == 1  # a base of zeros
    assert m[1].chunk_ids[6] == ZERO_ID and 6 not in m[2].deltas
    assert m[2].deltas[5][0].ranges == ((100, 300), (9000, 500))
    assert m[2].chunk_length(10) == 20000 and m[2].deltas[10][0].ranges == ((19000, 1000),)
    assert m[3].deltas[7] == [Layer(ZERO_ID, ((8192, 8192),))]  # a layer of zeros
    assert [layer.blob_id == ZERO_ID for layer in m[4].deltas[7]] == [True, False]
    assert overlap(*m[4].deltas[7])
    for run in range(3, 7):  # untouched since run 2: inherited as they were
        assert all(m[run].deltas[i] == m[2].deltas[i] for i in (2, 3, 4, 5, 10)), run
    assert all(m[run].deltas[7] == m[4].deltas[7] for run in (5, 6))
    layers = {layer.blob_id for mm in m.values() for layers in mm.deltas.values() for layer in layers}
    assert all(cid in vault.load_index().locations for cid in layers - {ZERO_ID}), "a layer is not stored"
    vm2 = vault.read_manifest(BackupId.parse(v2_id(2, 2)))
    assert vm2.version == 2 and sorted(vm2.deltas) == [0] and len(vm2.deltas[0]) == 1


def make_vault_v2(root: Path, images: dict[str, Path], *, encrypted: bool, keyfile: bytes | None) -> dict[str, Any]:
    assert MAX_LAYERS == 4, "V2_VM1_WRITES layers chunk 1 up to MAX_LAYERS, then once more"
    vault = new_vault(root, encrypted=encrypted, keyfile=keyfile)
    results: dict[str, BackupResult] = {}
    for vm, writes in ((1, V2_VM1_WRITES), (2, V2_VM2_WRITES)):
        results[v2_id(1, vm)] = backup(vault, images[v2_id(1, vm)], v2_id(1, vm), fixture="golden-v2")
        for run, changes in sorted(writes.items()):
            check_extents(images[v2_id(run - 1, vm)], images[v2_id(run, vm)], v2_extents(changes))
            results[v2_id(run, vm)] = backup(vault, images[v2_id(run, vm)], v2_id(run, vm), v2_id(run - 1, vm),
                                             v2_extents(changes), fixture="golden-v2")
    check_v2_manifests(vault, results)
    if not encrypted:
        gone = vault.read_manifest(BackupId.parse(v2_id(1, 2)))
        vault.delete_backup(gone.id)
        report = collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
        assert report.backups == 7 and report.bytes_freed > 0, report
        assert gone.chunk_ids[1] not in vault.load_index().locations  # collected: only the full named it
    return describe(vault, root, images, encrypted=encrypted, manifests=True)


MAKERS = {1: (make_images, make_vault), 2: (v2_images, make_vault_v2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", type=int, choices=sorted(MAKERS), default=1, help="the vault format version")
    parser.add_argument("--out", type=Path, help="default: tests/fixtures/golden-v<format>")
    parser.add_argument("--force", action="store_true", help="replace existing fixtures (see above: almost never)")
    args = parser.parse_args(argv)
    version: int = args.format
    out: Path = args.out or REPO / "tests" / "fixtures" / f"golden-v{version}"
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print(f"{out} exists: golden vaults are never regenerated (use --force only for new fixtures)",
                  file=sys.stderr)
            return 1
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    keyfile = blake3.blake3(f"raksha golden v{version} key file".encode()).digest(length=64)
    (out / KEYFILE).write_bytes(keyfile)
    images_of, vault_of = MAKERS[version]
    with tempfile.TemporaryDirectory() as tmp:
        images = images_of(Path(tmp))
        expected = {
            "format_version": version,
            "generated_by": "scripts/make-golden-vault.py" + (f" --format {version}" if version > 1 else ""),
            "vaults": {
                "plain": vault_of(out / "plain", images, encrypted=False, keyfile=None),
                "encrypted": vault_of(out / "encrypted", images, encrypted=True, keyfile=keyfile),
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
