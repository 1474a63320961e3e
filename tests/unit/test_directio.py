"""The engine's allocation-free I/O: O_DIRECT reads and writes through page-aligned buffers, with
ordinary I/O wherever alignment or the filesystem does not allow it, and zero blocks left out of
fresh images."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import blake3
import pytest

from raksha.domain.errors import SourceError
from raksha.vault.directio import ALIGN, SequentialFile, aligned_span, nonzero_runs, pread_into
from raksha.vault.sources.raw import RawSource, RawTarget

MIB = 1 << 20


def _image(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_raw_source_readinto_aligned_unaligned_and_plain_memory(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 1234)  # a tail that is not block-aligned
    src = RawSource(str(_image(tmp_path / "a.img", data)))
    try:
        buf = mmap.mmap(-1, MIB)
        view = memoryview(buf)
        src.readinto(MIB, view)  # aligned: O_DIRECT where the filesystem has it
        assert view == data[MIB : 2 * MIB]
        src.readinto(3 * MIB, view[:1234])  # the short last chunk: an ordinary read
        assert view[:1234] == data[3 * MIB :]
        src.readinto(ALIGN + 7, view[:5000])  # unaligned offset and length
        assert view[:5000] == data[ALIGN + 7 : ALIGN + 5007]
        plain = memoryview(bytearray(ALIGN * 3))[1:]  # memory that is not page-aligned
        plain = plain[: ALIGN * 2]
        src.readinto(0, plain)
        assert plain == data[: ALIGN * 2]
        with pytest.raises(SourceError, match="short read"):
            src.readinto(3 * MIB, view[: ALIGN * 2])  # past the end of the disk
        view.release()
    finally:
        src.close()


def test_raw_target_writes_views_in_place_and_copies_the_rest(tmp_path: Path) -> None:
    size = 4 * MIB
    target = RawTarget(str(tmp_path / "out.img"), size, fresh=True)
    aligned = mmap.mmap(-1, MIB)
    aligned[:] = os.urandom(MIB)
    unaligned = memoryview(bytearray(MIB + 1))[1:]
    unaligned[:] = os.urandom(MIB)
    odd = os.urandom(1000)
    try:
        target.pwrite(memoryview(aligned), 0)  # straight from the caller's aligned buffer
        target.pwrite(unaligned, MIB)  # a view of unaligned memory: EINVAL, then copied
        target.pwrite(bytes(aligned), 2 * MIB)  # bytes: copied into an aligned buffer
        target.pwrite(odd, 3 * MIB + 5)  # unaligned: an ordinary write
        target.pwrite(memoryview(aligned)[:4096], 3 * MIB + 8192)  # aligned but small: buffered too
        target.flush()
    finally:
        target.close()
    out = (tmp_path / "out.img").read_bytes()
    assert len(out) == size
    assert out[:MIB] == aligned[:] == out[2 * MIB : 3 * MIB]
    assert out[MIB : 2 * MIB] == unaligned
    assert out[3 * MIB + 5 : 3 * MIB + 1005] == odd
    assert out[3 * MIB : 3 * MIB + 5] == bytes(5)
    assert out[3 * MIB + 8192 : 3 * MIB + 12288] == aligned[:4096]


def test_pread_into_returns_the_range_from_an_aligned_read(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 100)
    path = _image(tmp_path / "obj", data)
    buf = mmap.mmap(-1, aligned_span(MIB - 3, MIB + 10))
    assert pread_into(path, MIB - 3, MIB + 10, buf) == data[MIB - 3 : 2 * MIB + 7]
    assert pread_into(path, 2 * MIB, MIB, buf) == data[2 * MIB :]  # short at the end of the file
    with pytest.raises(ValueError):
        pread_into(path, 0, len(buf) + 1, buf)


def test_sequential_file_hashes_exactly_what_it_writes(tmp_path: Path) -> None:
    hasher = blake3.blake3()
    buffers = [mmap.mmap(-1, 64 << 10), mmap.mmap(-1, 64 << 10)]
    parts = [os.urandom(n) for n in (10, 70_000, 65_536, 3, 200_001)]
    f = SequentialFile(tmp_path / "pack.partial", hasher=hasher, buffers=buffers)
    for part in parts:
        f.write(memoryview(part))
    f.finish()
    whole = b"".join(parts)
    assert (tmp_path / "pack.partial").read_bytes() == whole  # padding cut off
    assert hasher.digest() == blake3.blake3(whole).digest()
    assert not buffers[0].closed  # lent buffers stay usable for the next pack
    buffers[0][:3] = b"abc"


def test_nonzero_runs() -> None:
    buf = mmap.mmap(-1, MIB)
    buf[:] = os.urandom(MIB)
    assert nonzero_runs(buf, MIB) == [(0, MIB)]
    buf[ALIGN : 3 * ALIGN] = bytes(2 * ALIGN)  # two zero blocks
    buf[10 * ALIGN] = 1  # random, it is zero one time in 256, and block 10 with it
    buf[10 * ALIGN + 1 : 12 * ALIGN] = bytes(2 * ALIGN - 1)  # one whole zero block, unaligned run
    buf[MIB - ALIGN :] = bytes(ALIGN)  # zero at the end
    assert nonzero_runs(buf, MIB) == [(0, ALIGN), (3 * ALIGN, 11 * ALIGN), (12 * ALIGN, MIB - ALIGN)]
    assert nonzero_runs(buf, 3 * ALIGN) == [(0, ALIGN)]  # a short chunk ending in zero blocks
    assert nonzero_runs(buf, ALIGN + 100) == [(0, ALIGN + 100)]  # a partial last block is always written
    buf[:] = bytes(MIB)
    assert nonzero_runs(buf, MIB) == []
