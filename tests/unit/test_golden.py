"""The golden vaults (tests/fixtures/golden-v<N>/) must be readable by every future Raksha.

They were written once by scripts/make-golden-vault.py (``--format N``) and are committed; these
tests only read copies of them. If one fails, the change under test breaks compatibility with
vaults that exist in the field: fix the reader, never the fixtures.

- golden-v1: version-1 manifests (whole chunks only), a superseded index left by a killed gc;
- golden-v2: version-2 manifests with deltas (format.md §8.1): chunks stored as a base plus
  ordered layers of changed bytes, next to the version-1 manifests of the fulls.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import blake3_file, index_objects
from raksha.domain.errors import VaultKeyError
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.deltas import Layer
from raksha.vault.format.keys import Secret
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.operations.catalog import list_backups
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VERSIONS = (1, 2)
EXPECTED: dict[int, dict[str, Any]] = {
    v: json.loads((FIXTURES / f"golden-v{v}" / "expected.json").read_text()) for v in VERSIONS}
VAULTS = [(v, name) for v in VERSIONS for name in sorted(EXPECTED[v]["vaults"])]
BACKUPS = {(1, "encrypted"): 3, (1, "plain"): 3, (2, "encrypted"): 8, (2, "plain"): 7}


def golden_dir(version: int) -> Path:
    return FIXTURES / f"golden-v{version}"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_the_fixtures_are_what_this_test_expects(version: int) -> None:
    expected = EXPECTED[version]
    assert expected["format_version"] == version
    assert sorted(expected["vaults"]) == ["encrypted", "plain"]
    for name in expected["vaults"]:
        config = json.loads((golden_dir(version) / name / "config").read_text())
        assert config["format"] == "raksha-vault" and config["version"] == 1
        assert config["vault_id"] == expected["vaults"][name]["vault_id"]
        assert len(expected["vaults"][name]["backups"]) == BACKUPS[version, name]
    size = sum(p.stat().st_size for p in golden_dir(version).rglob("*") if p.is_file())
    assert size < 1 << 20


def copy_of(version: int, name: str, tmp_path: Path) -> Path:
    """A private copy of a golden vault: tests never write to the fixtures, not even a lock."""
    copy = tmp_path / f"v{version}-{name}"
    shutil.copytree(golden_dir(version) / name, copy)
    return copy


Golden = tuple[int, str, Path, dict[str, Any]]


@pytest.fixture(params=VAULTS, ids=[f"v{v}-{name}" for v, name in VAULTS])
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> Golden:
    """(format version, vault name, a private copy of that golden vault, its expectations)."""
    version, name = request.param
    return version, name, copy_of(version, name, tmp_path), EXPECTED[version]["vaults"][name]


def open_golden(path: Path, expected: dict[str, Any], secret: Secret | None = None) -> Vault:
    if expected["encrypted"] and secret is None:
        secret = Secret(passphrase=expected["passphrase"].encode())
    return Vault.open(LocalBackend(path), secret)


def restores_as_expected(vault: Vault, expected: dict[str, Any], tmp_path: Path) -> None:
    assert [str(b) for b in vault.backup_ids()] == sorted(expected["backups"])
    for bid, want in expected["backups"].items():
        out = tmp_path / f"{bid.replace('/', '_')}.img"
        result = restore_backup(vault, BackupId.parse(bid), str(out), threads=2)
        assert blake3_file(out) == want["blake3"], f"{bid} restores to different bytes"
        assert out.stat().st_size == want["virtual_size"]
        assert result.content_digest == want["content_digest"]


def test_every_golden_backup_restores_bit_exact(golden: Golden, tmp_path: Path) -> None:
    _, _, path, expected = golden
    restores_as_expected(open_golden(path, expected), expected, tmp_path)


def test_golden_vaults_verify_clean(golden: Golden) -> None:
    version, name, path, expected = golden
    report = verify_vault(open_golden(path, expected), threads=2)
    assert report.ok, report.summary()
    assert report.backups_checked == BACKUPS[version, name] and report.chunks_checked > 0


def test_golden_catalogue(golden: Golden) -> None:
    _, _, path, expected = golden
    rows = list_backups(open_golden(path, expected))
    got = {r["id"]: (r["kind"], r["parent"], r["virtual_size"], r["content_digest"]) for r in rows}
    assert got == {bid: (w["kind"], w["parent"], w["virtual_size"], w["content_digest"])
                   for bid, w in expected["backups"].items()}
    assert all("error" not in r for r in rows)


def test_golden_plain_vault_has_a_superseded_index_that_readers_ignore(tmp_path: Path) -> None:
    """The v1 plain vault keeps an index that a later one supersedes and whose pack is gone."""
    expected = EXPECTED[1]["vaults"]["plain"]
    stale = expected["superseded_index_left"]
    path = copy_of(1, "plain", tmp_path)
    assert (path / "index" / stale).is_file()
    vault = open_golden(path, expected)
    files = index_objects(vault)
    assert stale in {s.hex() for f in files.values() for s in f.supersedes}
    assert stale not in vault.load_index().index_ids
    assert any(not (path / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex()).exists()
               for loc in files[stale].entries.values())


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_golden_encrypted_vault_opens_with_its_passphrase_or_its_key_file(version: int, tmp_path: Path) -> None:
    expected = EXPECTED[version]["vaults"]["encrypted"]
    keyfile = (golden_dir(version) / expected["keyfile"]).read_bytes()
    path = copy_of(version, "encrypted", tmp_path)
    by_pass = open_golden(path, expected)
    by_file = open_golden(path, expected, Secret(keyfile=keyfile))
    bid = BackupId.parse(sorted(expected["backups"])[0])
    assert by_pass.read_manifest(bid).chunk_ids == by_file.read_manifest(bid).chunk_ids
    assert sorted(k["kdf"] for k in by_pass.list_keys()) == ["argon2id", "keyfile"]
    with pytest.raises(VaultKeyError) as caught:
        open_golden(path, expected, Secret(passphrase=b"not golden"))
    assert caught.value.code == "VAULT_KEY_WRONG"
    with pytest.raises(VaultKeyError) as required:
        Vault.open(LocalBackend(path))
    assert required.value.code == "VAULT_KEY_REQUIRED"


# -- golden-v2: deltas (format.md §8.1) ---------------------------------------------------------------

def deltas_json(m: Manifest) -> dict[str, Any]:
    """A manifest's deltas as expected.json records them: chunk index -> its base and layers."""
    return {str(i): {"base": m.chunk_ids[i].hex(),
                     "layers": [{"blob": layer.blob_id.hex(), "ranges": [list(r) for r in layer.ranges]}
                                for layer in layers]}
            for i, layers in sorted(m.deltas.items())}


def _overlap(a: Layer, b: Layer) -> bool:
    return any(o1 < o2 + n2 and o2 < o1 + n1 for o1, n1 in a.ranges for o2, n2 in b.ranges)


def _end(layers: list[Layer]) -> int:
    """Where the last range of the last layer ends, relative to the chunk."""
    off, n = layers[-1].ranges[-1]
    return off + n


def delta_cases(manifests: dict[str, Manifest]) -> set[str]:
    """Which of the shapes golden-v2 exists for these manifests hold."""
    found = set()
    for m in manifests.values():
        found.add(f"version {m.version}")
        parent = manifests.get(m.parent or "")
        for i, layers in m.deltas.items():
            found.add(f"{len(layers)} layers")
            if any(_overlap(a, b) for k, a in enumerate(layers) for b in layers[k + 1 :]):
                found.add("overlapping layers")
            if any(layer.blob_id == ZERO_ID for layer in layers):
                found.add("a layer of zeros")
            if m.chunk_ids[i] == ZERO_ID:
                found.add("a layer on a base of zeros")
            if any(len(layer.ranges) > 1 for layer in layers):
                found.add("a layer of several ranges")
            if m.chunk_length(i) < m.chunk_size and _end(layers) == m.chunk_length(i):
                found.add("a layer up to the end of a short last chunk")
            after = m.deltas.get(i + 1)
            if _end(layers) == m.chunk_size and after and after[-1].ranges[0][0] == 0:
                found.add("layers across a chunk boundary")
            if parent is not None and parent.deltas.get(i) == layers:
                found.add("layers inherited from the parent")
        if parent is not None and any(i not in m.deltas and m.chunk_ids[i] != parent.chunk_ids[i]
                                      for i in parent.deltas):
            found.add("a layered chunk rebuilt whole")
    return found


V2_CASES = {"version 1", "version 2", "1 layers", "2 layers", "3 layers", "4 layers", "overlapping layers",
            "a layer of zeros", "a layer on a base of zeros", "a layer of several ranges",
            "a layer up to the end of a short last chunk", "layers across a chunk boundary",
            "layers inherited from the parent", "a layered chunk rebuilt whole"}

GOLDEN_V2 = [name for v, name in VAULTS if v == 2]


@pytest.mark.parametrize("name", GOLDEN_V2)
def test_golden_v2_manifests_decode_with_their_deltas(name: str, tmp_path: Path) -> None:
    expected = EXPECTED[2]["vaults"][name]
    vault = open_golden(copy_of(2, name, tmp_path), expected)
    manifests = {bid: vault.read_manifest(BackupId.parse(bid)) for bid in expected["backups"]}
    for bid, m in manifests.items():
        want = expected["backups"][bid]
        assert (m.version, deltas_json(m)) == (want["manifest_version"], want["deltas"]), bid
        assert (m.version == 1) == (want["kind"] == "full")
    assert delta_cases(manifests) == V2_CASES
    stored = vault.load_index().locations
    layers = {layer.blob_id for m in manifests.values() for ls in m.deltas.values() for layer in ls}
    assert ZERO_ID in layers and all(b in stored for b in layers - {ZERO_ID})


def test_golden_v2_plain_vault_restores_an_incremental_whose_parent_was_collected(tmp_path: Path) -> None:
    """vm2's full was deleted and a gc run: its incremental's bases and layers stayed."""
    expected = EXPECTED[2]["vaults"]["plain"]
    inc = BackupId.parse("golden/run2/vm2/vdb")
    want = expected["backups"][str(inc)]
    vault = open_golden(copy_of(2, "plain", tmp_path), expected)
    assert want["parent"] == "golden/run1/vm2/vdb" and BackupId.parse(want["parent"]) not in vault.backup_ids()
    m = vault.read_manifest(inc)
    assert m.deltas and m.blob_ids() <= set(vault.load_index().locations)
    restore_backup(vault, inc, str(tmp_path / "out.img"), threads=2)
    assert blake3_file(tmp_path / "out.img") == want["blake3"]


@pytest.mark.parametrize("name", GOLDEN_V2)
def test_gc_of_a_golden_v2_vault_keeps_every_base_and_layer(name: str, tmp_path: Path) -> None:
    expected = EXPECTED[2]["vaults"][name]
    vault = open_golden(copy_of(2, name, tmp_path), expected)
    report = collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
    assert report.packs_missing == 0 and report.backups == BACKUPS[2, name]
    restores_as_expected(vault, expected, tmp_path)
    assert verify_vault(vault, threads=2).ok
