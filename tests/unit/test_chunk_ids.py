"""A manifest's ids: a large disk's take no memory, sparse or dense, and everything reads as if they did."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from raksha.domain.errors import StorageFull, VaultCorrupt
from raksha.vault import repository
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format import sealed
from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.manifest import Manifest, decode_manifest, encode_manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault

MIB = 1 << 20
BID = BackupId.parse("job/run/vm/vda")


def sparse_manifest(count: int, data: dict[int, bytes]) -> Manifest:
    ids = ChunkIds.zeros(count)
    for i, cid in data.items():
        ids[i] = cid
    return Manifest(id=BID, virtual_size=count * MIB, chunk_size=MIB, chunk_ids=ids, source_format="raw",
                    created="2026-11-26T00:00:00Z")


def test_a_large_sparse_id_list_reads_like_a_list() -> None:
    data = {0: os.urandom(32), 70_000: os.urandom(32), 99_999: os.urandom(32)}
    m = sparse_manifest(100_000, data)
    plain = [data.get(i, ZERO_ID) for i in range(100_000)]
    assert m.chunk_ids == plain and list(m.chunk_ids) == plain
    assert [m.chunk_ids[i] for i in (0, 1, 70_000, 99_999)] == [plain[i] for i in (0, 1, 70_000, 99_999)]
    assert list(m.chunk_ids.ids(69_999, 70_002)) == plain[69_999:70_002]
    assert b"".join(m.chunk_ids.pieces()) == b"".join(plain)
    assert m.chunk_ids.count(ZERO_ID) == 100_000 - 3 and m.blob_ids() == set(data.values())
    assert m.chunk_ids.resized(80_000) == plain[:80_000]
    assert m.chunk_ids.resized(100_010) == plain + [ZERO_ID] * 10
    back = decode_manifest(encode_manifest(m, Crypto()), BID, Crypto())
    assert back.chunk_ids == m.chunk_ids and back.content_digest() == m.content_digest()


def test_a_1_tib_sparse_disk_s_manifest_takes_no_memory_for_its_zero_ids() -> None:
    """Built, encoded, decoded and walked: 32 MB of ids, a few MB of RSS (each step touched all 32 before)."""
    script = """
import os
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.manifest import decode_manifest, encode_manifest
from test_chunk_ids import BID, sparse_manifest
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
before = rss()
m = sparse_manifest(1 << 20, {i * 65536: os.urandom(32) for i in range(16)})
back = decode_manifest(encode_manifest(m, Crypto()), BID, Crypto())
assert len(back.blob_ids()) == 16 and sum(1 for cid in back.chunk_ids if cid != ZERO_ID) == 16
print(rss() - before)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                               env=env).stdout)
    assert grown < 8  # MB


def dense_manifest(count: int) -> Manifest:
    ids = ChunkIds.zeros(count)
    ids.fill(lambda view: view.__setitem__(slice(None), os.urandom(len(view))))
    return Manifest(id=BID, virtual_size=count * MIB, chunk_size=MIB, chunk_ids=ids, source_format="raw",
                    created="2026-11-26T00:00:00Z")


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Vault:
    config = VaultConfig.new(encrypted=request.param)
    secret = Secret(passphrase=b"ids") if request.param else None
    return Vault.init(LocalBackend(tmp_path / "vault", create=True), config, secret, KdfParams(memory_kib=8192))


def test_a_large_manifest_is_staged_then_read_in_pieces(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids of 40,000 chunks (1.3 MB, in a file): sealed into a staged file, stored, and read back by ranges
    (pieces of 100 kB here), never as one object."""
    monkeypatch.setattr(repository, "MANIFEST_WHOLE", 64 << 10)
    monkeypatch.setattr(sealed, "STREAM_PIECE", 100_000)
    m = dense_manifest(40_000)
    assert m.chunk_ids.in_file
    vault.write_backup(m, {"note": "large"})
    assert list(vault.backend.staging_dir().iterdir()) == []
    monkeypatch.setattr(vault.backend, "get", lambda key: pytest.fail(f"{key} read whole"))
    ranges: list[int] = []
    real_range = vault.backend.get_range
    monkeypatch.setattr(vault.backend, "get_range", lambda key, offset, n: (
        ranges.append(n), real_range(key, offset, n))[1])

    back = vault.read_manifest(BID)

    assert back.chunk_ids == m.chunk_ids and back.content_digest() == m.content_digest()
    assert len(ranges) >= 13 and max(ranges) <= 100_000  # 1.3 MB in pieces of 100 kB
    stored = Path(vault.backend.url) / BID.backup_key
    assert decode_manifest(stored.read_bytes(), BID, vault.crypto).chunk_ids == m.chunk_ids  # the same format


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_damage_to_a_large_manifest_is_found_when_read_in_pieces(vault: Vault, monkeypatch: pytest.MonkeyPatch,
                                                                  where: str) -> None:
    monkeypatch.setattr(repository, "MANIFEST_WHOLE", 64 << 10)
    monkeypatch.setattr(sealed, "STREAM_PIECE", 100_000)
    vault.write_backup(dense_manifest(40_000), {})
    stored = Path(vault.backend.url) / BID.backup_key
    data = bytearray(stored.read_bytes())
    data[{"start": 40, "middle": len(data) // 2, "end": len(data) - 1}[where]] ^= 4
    stored.chmod(0o600)
    stored.write_bytes(data)
    with pytest.raises(VaultCorrupt):
        vault.read_manifest(BID)


def test_a_dense_1_tib_disk_s_manifest_is_written_and_read_in_little_memory(tmp_path: Path) -> None:
    """A million distinct ids (32 MB): built, sealed through a staged file, read back in pieces and
    walked, in a few MB of RSS (all of it held two or three times before)."""
    script = """
import sys
from pathlib import Path
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.repository import Vault
from test_chunk_ids import BID, dense_manifest
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
root = Path(sys.argv[1])
vault = Vault.init(LocalBackend(root / "v", create=True), VaultConfig.new(encrypted=True), Secret(passphrase=b"x"),
                   KdfParams(memory_kib=8192))
before = rss()
m = dense_manifest(1 << 20)
vault.write_backup(m, {})
back = vault.read_manifest(BID)
assert back.chunk_ids.count(b"\\0" * 32) == 0 and back.content_digest() == m.content_digest()
print(rss() - before)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    grown = int(subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True,
                               text=True, env=env).stdout)
    assert grown < 12  # MB


def test_a_full_tmpdir_is_storage_full_naming_it(tmpfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch,
                                                 ) -> None:
    where = tmpfs("64k")
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    ids = ChunkIds.zeros(1 << 16)  # 2 MiB of ids: in a file there
    with pytest.raises(StorageFull, match=f"no space left in {where}.*TMPDIR") as caught:
        ids.fill(lambda view: view.__setitem__(slice(None), os.urandom(len(view))))
    assert caught.value.code == "STORAGE_FULL"
