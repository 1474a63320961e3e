"""The golden version-1 vaults (tests/fixtures/golden-v1/) must be readable by every future Raksha.

They were written once by scripts/make-golden-vault.py and are committed; this test only reads
copies of them. If it fails, the change under test breaks compatibility with vaults that exist
in the field: fix the reader, never the fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import blake3_file
from raksha.domain.errors import VaultKeyError
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.keys import Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.operations.catalog import list_backups
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden-v1"
EXPECTED: dict[str, Any] = json.loads((GOLDEN / "expected.json").read_text())
VAULTS = sorted(EXPECTED["vaults"])


def test_the_fixtures_are_what_this_test_expects() -> None:
    assert EXPECTED["format_version"] == 1
    assert VAULTS == ["encrypted", "plain"]
    for name in VAULTS:
        config = json.loads((GOLDEN / name / "config").read_text())
        assert config["format"] == "raksha-vault" and config["version"] == 1
        assert config["vault_id"] == EXPECTED["vaults"][name]["vault_id"]
        assert len(EXPECTED["vaults"][name]["backups"]) == 3
    size = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert size < 1 << 20


def copy_of(name: str, tmp_path: Path) -> Path:
    """A private copy of a golden vault: tests never write to the fixtures, not even a lock."""
    copy = tmp_path / name
    shutil.copytree(GOLDEN / name, copy)
    return copy


@pytest.fixture(params=VAULTS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, dict[str, Any]]:
    """(name, a private copy of that golden vault, its expectations)."""
    name: str = request.param
    return name, copy_of(name, tmp_path), EXPECTED["vaults"][name]


def open_golden(path: Path, expected: dict[str, Any], secret: Secret | None = None) -> Vault:
    if expected["encrypted"] and secret is None:
        secret = Secret(passphrase=expected["passphrase"].encode())
    return Vault.open(LocalBackend(path), secret)


def test_every_golden_backup_restores_bit_exact(golden: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    _, path, expected = golden
    vault = open_golden(path, expected)
    assert [str(b) for b in vault.backup_ids()] == sorted(expected["backups"])
    for bid, want in expected["backups"].items():
        out = tmp_path / f"{bid.replace('/', '_')}.img"
        result = restore_backup(vault, BackupId.parse(bid), str(out), threads=2)
        assert blake3_file(out) == want["blake3"], f"{bid} restores to different bytes"
        assert out.stat().st_size == want["virtual_size"]
        assert result.content_digest == want["content_digest"]


def test_golden_vaults_verify_clean(golden: tuple[str, Path, dict[str, Any]]) -> None:
    _, path, expected = golden
    report = verify_vault(open_golden(path, expected), threads=2)
    assert report.ok, report.summary()
    assert report.backups_checked == 3 and report.chunks_checked > 0


def test_golden_catalogue(golden: tuple[str, Path, dict[str, Any]]) -> None:
    _, path, expected = golden
    rows = list_backups(open_golden(path, expected))
    got = {r["id"]: (r["kind"], r["parent"], r["virtual_size"], r["content_digest"]) for r in rows}
    assert got == {bid: (w["kind"], w["parent"], w["virtual_size"], w["content_digest"])
                   for bid, w in expected["backups"].items()}
    assert all("error" not in r for r in rows)


def test_golden_plain_vault_has_a_superseded_index_that_readers_ignore(tmp_path: Path) -> None:
    """The plain vault keeps an index that a later one supersedes and whose pack is gone."""
    expected = EXPECTED["vaults"]["plain"]
    stale = expected["superseded_index_left"]
    path = copy_of("plain", tmp_path)
    assert (path / "index" / stale).is_file()
    vault = open_golden(path, expected)
    files = vault.read_index_files()
    assert stale in {s.hex() for f in files.values() for s in f.supersedes}
    assert stale not in vault.load_index().index_ids
    assert any(not (path / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex()).exists()
               for loc in files[stale].entries.values())


def test_golden_encrypted_vault_opens_with_its_passphrase_or_its_key_file(tmp_path: Path) -> None:
    expected = EXPECTED["vaults"]["encrypted"]
    keyfile = (GOLDEN / expected["keyfile"]).read_bytes()
    path = copy_of("encrypted", tmp_path)
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
