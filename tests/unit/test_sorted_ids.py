"""A vault's stored ids in a temporary file: the answers of a set, in memory that does not grow with them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from raksha.domain.errors import StorageFull
from raksha.vault.format import sorted_ids
from raksha.vault.format.sorted_ids import DiskIdSet, SortedRun


def ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def test_ids_are_found_exactly_across_partitions_and_spilled_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sorted_ids, "PARTITION", 500)
    monkeypatch.setattr(sorted_ids, "FENCE", 8)
    monkeypatch.setattr(sorted_ids, "BUFFER_BYTES", 8 * 32)  # every partition written out in small pieces
    members, others = ids(6000, 1), ids(6000, 2)
    stored = DiskIdSet(expected=6000, what="test ids")
    stored.update(members[:4000])
    stored.update(members[3000:])  # 1000 twice, as two index objects may list a chunk
    stored.finish()

    assert len(stored._runs) == 16 and stored._parts is None  # 6000 / 500 -> 16 partitions; pieces merged
    assert len(stored) == 6000
    assert all(cid in stored for cid in members)
    assert not any(cid in stored for cid in others)
    assert b"short" not in stored and "text" not in stored
    listed = list(stored)  # each once, a run at a time
    assert len(listed) == 6000 and set(listed) == set(members)
    stored.close()


def test_an_empty_set_and_one_of_a_single_partition() -> None:
    empty = DiskIdSet(expected=0, what="test ids").finish()
    assert len(empty) == 0 and ids(1, 3)[0] not in empty
    few = ids(10, 4)
    small = DiskIdSet(expected=10, what="test ids")
    small.update(few)
    small.finish()
    assert len(small._runs) == 1 and small._parts is None and all(cid in small for cid in few)
    for s in (empty, small):
        s.close()


def test_a_set_answers_only_once_finished_and_takes_no_more_after() -> None:
    stored = DiskIdSet(expected=10, what="test ids")
    stored.update(ids(3, 5))
    with pytest.raises(ValueError, match="once finished"):
        _ = ids(1, 5)[0] in stored
    stored.finish()
    with pytest.raises(ValueError, match="once finished"):
        stored.update(ids(1, 6))
    with pytest.raises(ValueError, match="32 bytes"):
        DiskIdSet(expected=1, what="test ids").update([b"short"])
    stored.close()


def test_ids_sharing_their_first_bytes_across_fences_are_found(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Fence keys are 8-byte prefixes: ids with one prefix may fill several blocks."""
    monkeypatch.setattr(sorted_ids, "FENCE", 4)
    prefix = b"\x42" * 8
    same = [prefix + tail[:24] for tail in ids(40, 6)]
    run_ids = sorted(set(same + ids(24, 7)))
    with open(tmp_path / "run", "w+b", buffering=0) as f:
        run = SortedRun.write(f, 4096, run_ids, "test ids")
        assert run.count == 64 and len(run.fences) == 16
        assert all(run.contains(f, cid, "test ids") for cid in run_ids)
        assert not any(run.contains(f, prefix + tail[:24], "test ids") for tail in ids(40, 8))
        assert not run.contains(f, b"\x00" * 32, "test ids") and not run.contains(f, b"\xff" * 32, "test ids")


def test_memory_does_not_grow_with_the_ids() -> None:
    """A million ids: an IdSet's peak grows ~45 MB; this one's by its write buffers, one partition sorted
    at a time and 1/16 byte of fences an id."""
    script = """
import random, sys
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.sorted_ids import DiskIdSet
from raksha.vault.malloc import fix_mmap_threshold
fix_mmap_threshold()
def peak():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) >> 10
rng = random.Random(9)
before = peak()
ids = IdSet() if sys.argv[1] == 'memory' else DiskIdSet(1_000_000, 'test ids')
for _ in range(100):
    ids.update([rng.randbytes(32) for _ in range(10_000)])
if sys.argv[1] == 'disk':
    ids.finish()
assert len(ids) == 1_000_000
print(peak() - before)
"""

    def grown(kind: str) -> int:
        return int(subprocess.run([sys.executable, "-c", script, kind], check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout)

    assert grown("memory") >= 40  # MB: what the file saves
    assert grown("disk") <= 20  # 12 here


def test_a_full_tmpdir_is_storage_full(tmpfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs("64k")))
    stored = DiskIdSet(expected=8192, what="the vault's chunk ids")
    stored.update(ids(8192, 10))  # 256 KiB: more than the tmpfs holds
    with pytest.raises(StorageFull, match="the vault's chunk ids"):
        stored.finish()
    stored.close()


def test_an_id_whose_bytes_span_two_stored_ids_is_not_found() -> None:
    a, b = b"\x01" * 16 + b"\x02" * 16, b"\x03" * 16 + b"\x04" * 16
    across = a[16:] + b[:16]  # in the block's bytes, but not at an id's boundary
    assert sorted_ids._find_id(a + b, b) == 1 and sorted_ids._find_id(a + b, a) == 0
    assert sorted_ids._find_id(a + b, across) == -1
    half_a, half_b = b"\x0a" * 16, b"\x0b" * 16  # its bytes at 16 (across two ids), then as the third id
    assert sorted_ids._find_id(b"\x00" * 16 + half_a + half_b + b"\x01" * 16 + half_a + half_b, half_a + half_b) == 2


def test_rows_number_the_ids_from_zero_without_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sorted_ids, "PARTITION", 100)
    members = ids(1000, 5)
    stored = DiskIdSet(expected=1000, what="test ids")
    stored.update(members)
    stored.finish()
    assert sorted(stored.row_of(cid) for cid in members) == list(range(1000))
    assert stored.row_of(ids(1, 6)[0]) == -1
    # A run at a time, as a join reads them: the same rows, each id in the run its hash names.
    joined = {}
    for part in range(stored.partitions):
        rows = stored.partition_rows(part)
        assert all(hash(cid) % stored.partitions == part for cid in rows)
        joined.update(rows)
    assert stored.partitions == 16 and joined == {cid: stored.row_of(cid) for cid in members}
    stored.close()
