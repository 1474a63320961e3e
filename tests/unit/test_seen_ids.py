"""What a backup stored so far: exact answers, in memory that does not grow with the disk."""

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
from raksha.vault.engine import seen_ids
from raksha.vault.engine.seen_ids import SeenIds
from raksha.vault.format import sorted_ids


def ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def test_a_few_ids_stay_in_memory() -> None:
    seen = SeenIds(expected=10)
    a, b = ids(2, 1)
    seen.add(a)
    seen.add(a)
    assert a in seen and b not in seen and len(seen) == 1
    assert seen._file is None and seen._bloom is None  # no file, no filter for a small backup
    seen.close()


def test_ids_spilled_to_runs_are_still_found_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seen_ids, "RUN", 100)
    monkeypatch.setattr(sorted_ids, "FENCE", 8)
    added, others = ids(1050, 2), ids(5000, 3)
    seen = SeenIds(expected=len(added))
    for cid in added:
        seen.add(cid)
    for cid in added[:300]:  # again: not counted twice, though most are in runs now
        seen.add(cid)

    assert len(seen._runs) == 10 and len(seen) == 1050
    assert all(cid in seen for cid in added)
    assert not any(cid in seen for cid in others)  # Bloom filter hits are checked in the runs
    seen.close()


def test_ids_sharing_their_first_bytes_across_a_fence_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fence keys are 8-byte prefixes: a run of ids with the same prefix spans blocks."""
    monkeypatch.setattr(seen_ids, "RUN", 64)
    monkeypatch.setattr(sorted_ids, "FENCE", 4)
    prefix = b"\x42" * 8
    same = [prefix + tail[:24] for tail in ids(40, 4)]
    mixed = same + ids(24, 5)  # one run of 64, 40 of them under one prefix
    seen = SeenIds(expected=64)
    for cid in mixed:
        seen.add(cid)
    assert len(seen._runs) == 1
    assert all(cid in seen for cid in mixed)
    assert not any(prefix + tail[:24] in seen for tail in ids(40, 6))
    seen.close()


def test_memory_stops_growing_with_the_ids() -> None:
    """From 250,000 to 750,000 ids an IdSet grows ~25 MB; this, by its filter's share (~1 MB) and what the
    heap keeps of the spills (a few MB, as the backup's own process would: same malloc settings)."""
    script = """
import random
from raksha.vault.engine.seen_ids import SeenIds
from raksha.vault.format import sorted_ids
from raksha.vault.malloc import fix_mmap_threshold
fix_mmap_threshold()
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
rng = random.Random(7)
seen = SeenIds(expected=750_000)
for _ in range(250_000):
    seen.add(rng.randbytes(32))
first = rss()
for _ in range(500_000):
    seen.add(rng.randbytes(32))
assert len(seen) == 750_000
print(rss() - first)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout)
    assert grown <= 8  # MB


def test_a_full_tmpdir_is_storage_full(tmpfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs("64k")))
    monkeypatch.setattr(seen_ids, "RUN", 4096)  # a run of 128 KiB: more than the tmpfs holds
    seen = SeenIds(expected=8192)
    with pytest.raises(StorageFull):
        for cid in ids(4096, 8):
            seen.add(cid)
    seen.close()
