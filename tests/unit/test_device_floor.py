"""The benchmark's device floor (bench/device_floor.py): the I/O it times is the I/O a backup does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import load_bench

MIB = 1 << 20

floor = load_bench("device_floor")


def _sparse_image(path: Path) -> Path:
    """16 MiB with data in chunk 1 (whole), chunk 5 (4 KiB) and chunks 9-10 (straddling their border)."""
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        for off, n in ((1 * MIB, MIB), (5 * MIB + 8192, 4096), (10 * MIB - 4096, 8192)):
            f.seek(off)
            f.write(os.urandom(n))
    return path


def test_data_chunks_are_the_chunks_a_backup_reads(tmp_path: Path) -> None:
    image = _sparse_image(tmp_path / "img")
    assert floor.data_chunks(image) == [1 * MIB, 5 * MIB, 9 * MIB, 10 * MIB]
    # a sparse restore writes the data only, cut at chunk borders
    assert floor.data_pieces(image) == [(MIB, MIB), (5 * MIB + 8192, 4096), (10 * MIB - 4096, 4096), (10 * MIB, 4096)]


def test_measure_reads_and_writes_the_given_volumes(tmp_path: Path) -> None:
    image = _sparse_image(tmp_path / "img")
    try:
        os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    result = floor.measure(image, 3 * MIB, tmp_path, runs=1)
    assert result["read_bytes"] == 4 * MIB and result["stored_bytes"] == 3 * MIB
    assert result["data_bytes"] == MIB + 4096 + 8192
    assert result["backup_seconds"] > 0 and result["restore_seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # scratch files removed
