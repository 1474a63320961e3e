"""A process that opens a vault fixes glibc's mmap threshold: freed index objects leave no heap behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from raksha.vault import malloc

# Index objects of 5 MB decoded a few at a time while the chunk table grows in small pieces, as
# loading a large vault's index does; prints how much the RSS grew (MB) once the objects are freed.
LOAD = """
import sys
from raksha.vault import malloc
if sys.argv[1] == "fixed":
    assert malloc.fix_mmap_threshold() and malloc.fix_mmap_threshold()
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
before = rss()
table, objects = [], []
for i in range(40):
    objects.append(bytearray(5 << 20))
    if len(objects) > 3:
        objects.pop(0)
    table.append(bytearray(64 << 10))
objects.clear()
print(rss() - before)
"""


def grown_mb(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", LOAD, mode], check=True, capture_output=True,
                              text=True).stdout)


def test_freed_index_objects_leave_the_rss_once_the_threshold_is_fixed() -> None:
    fixed, default = grown_mb("fixed"), grown_mb("default")
    assert fixed < 12  # the table's 2.5 MB, and allocator slack
    assert default > fixed + 10  # glibc's own threshold kept freed 5 MB objects in the heap
    assert malloc.THRESHOLD > 2 << 20  # above a 2 MiB pack read and a 1 MiB chunk's blob: those stay heap


CHURN = """
import resource, sys
from raksha.vault import malloc
if sys.argv[1] == "fixed":
    assert malloc.fix_mmap_threshold()
for _ in range(20):  # warm up
    b"x" * (1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    b"x" * (1 << 20)  # a chunk-sized buffer, written, freed at once, as the hot loops make them
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_chunk_sized_buffers_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    """A fixed mmap threshold would leave glibc's trim threshold at 128 KiB: the heap given back after
    every chunk and faulted in for the next (a restore took 240,000 page faults instead of 27,000)."""
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True,
                                  text=True).stdout)

    assert faults("fixed") < 200 * 256 // 10  # a tenth of faulting every page of every buffer


# ---------------------------------------------------------------- the map pool


def test_a_map_given_back_is_handed_out_again_to_a_caller_asking_its_size() -> None:
    pool = malloc.MapPool(limit=8 << 20)
    first = pool.take(1 << 20)
    pool.give(first)
    assert pool.held == 1 << 20
    assert pool.take(1 << 20) is first
    assert pool.held == 0
    assert pool.take(1 << 20) is not first  # nothing kept: a new map


def test_a_map_given_twice_is_kept_once() -> None:
    pool = malloc.MapPool(limit=8 << 20)
    m = pool.take(1 << 20)
    pool.give(m, m)
    pool.give(m)
    assert pool.held == 1 << 20
    assert pool.take(1 << 20) is m and pool.take(1 << 20) is not m


def test_a_miss_unmaps_what_the_pool_keeps_of_other_sizes() -> None:
    """The pool keeps what the last kind of operation used: a restore's buffers never sit beside a
    backup's idle ones."""
    pool = malloc.MapPool(limit=8 << 20)
    small, large = pool.take(1 << 20), pool.take(2 << 20)
    pool.give(small)
    other = pool.take(2 << 20)
    assert other is not small and small.closed and pool.held == 0
    pool.give(large, other)
    assert pool.held == 4 << 20


def test_the_pool_keeps_no_more_than_its_limit_and_unmaps_the_rest() -> None:
    pool = malloc.MapPool(limit=2 << 20)
    maps = [pool.take(1 << 20) for _ in range(3)]
    pool.give(*maps)
    assert pool.held == 2 << 20
    assert [m.closed for m in maps] == [False, False, True]
    pool.clear()
    assert pool.held == 0 and all(m.closed for m in maps)


def test_a_map_still_viewed_is_dropped_without_an_error_and_a_closed_one_is_not_kept() -> None:
    pool = malloc.MapPool(limit=0)
    viewed = pool.take(1 << 20)
    view = memoryview(viewed)
    pool.give(viewed)  # over the limit: unmapped once the view goes
    assert not viewed.closed and pool.held == 0
    view.release()
    closed = malloc.anonymous_map(1 << 20)
    closed.close()
    malloc.MapPool().give(closed)  # nothing to keep


def test_maps_taken_at_once_from_many_threads_are_distinct() -> None:
    import threading

    pool = malloc.MapPool(limit=64 << 20)
    pool.give(*[malloc.anonymous_map(1 << 20) for _ in range(32)])
    taken: list[object] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(8):
            m = pool.take(1 << 20)
            with lock:
                taken.append(m)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in taken}) == 64 and pool.held == 0


BACKUPS = """
import hashlib, os, resource, sys
from pathlib import Path
from raksha.vault import malloc
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.open import open_source
work = Path(sys.argv[1])
if sys.argv[2] == "off":  # the pool keeps nothing: every backup maps its buffers afresh
    malloc.POOL._limit = 0
vault = Vault.init(LocalBackend(work / "vault", create=True), VaultConfig.new(encrypted=True),
                   Secret(passphrase=b"pool"), KdfParams(memory_kib=8192))
image = work / "disk.img"
faults, digests = [], []
for n in range(4):
    with open(image, "wb") as f:  # other bytes each time, some compressible: reused buffers hold the last
        for i in range(24):
            f.write(os.urandom(4096) * 256 if i % 2 else os.urandom(1 << 20))
    digests.append(hashlib.sha256(image.read_bytes()).hexdigest())
    source = open_source(str(image))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    backup_disk(vault, source, BackupId.parse(f"j/r{n}/vm/vda"))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    source.close()
held = malloc.POOL.held
for n, digest in enumerate(digests):
    out = work / f"r{n}.img"
    restore_backup(vault, BackupId.parse(f"j/r{n}/vm/vda"), str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest, n
print(faults[-1], held, malloc.POOL.held)
"""


def test_a_process_backing_up_again_reuses_the_last_backups_buffers(tmp_path: Path) -> None:
    """A long-running agent's backups: the pipeline's, the packer's and the encoders' buffers of one
    backup serve the next, which no longer faults their pages in (15-20 ms of CPU an incremental). Each
    backup's data comes back bit-exact, and a restore lets go of what the pool kept."""
    def run(mode: str) -> tuple[int, int, int]:
        work = tmp_path / mode
        work.mkdir()
        out = subprocess.run([sys.executable, "-c", BACKUPS, str(work), mode], check=True,
                             capture_output=True, text=True).stdout.split()
        return int(out[0]), int(out[1]), int(out[2])

    (reused, held, after_restore), (fresh, none_held, _) = run("on"), run("off")
    assert held >= 24 << 20 and none_held == 0  # 16 pipeline buffers of 1 MiB, 4 pack buffers of 2 MiB, ...
    assert after_restore == 0
    assert reused < fresh - 2000  # ~24 MiB of pages that no longer fault in: ~6,000 pages
