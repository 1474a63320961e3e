"""A manifest's ids: a sparse disk's zero ids take no memory, and everything reads as if they did."""

from __future__ import annotations

import os
import subprocess
import sys

from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.manifest import Manifest, decode_manifest, encode_manifest
from raksha.vault.format.naming import BackupId

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
