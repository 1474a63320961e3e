"""The benchmark's VM-image generator (bench/imagegen.py) on a small image."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import zstandard

SIZE = 64 << 20
BLOCK = 4096


def _load_imagegen() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "imagegen.py"
    spec = importlib.util.spec_from_file_location("bench_imagegen", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


imagegen = _load_imagegen()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def _allocated_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(end - start for start, end in imagegen.data_segments(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _covered_blocks(extents: list[list[int]]) -> set[int]:
    return {b for offset, length in extents for b in range(offset // BLOCK, (offset + length) // BLOCK)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("imagegen")
    base, changed, clone = root / "base.img", root / "changed.img", root / "clone.img"
    layout = imagegen.generate_image(base, SIZE, 1)
    return {
        "root": root,
        "base": base,
        "layout": layout,
        "changed": changed,
        "changed_extents": imagegen.make_changed_copy(base, changed, 0.01, 1),
        "clone": clone,
        "clone_extents": imagegen.make_clone(base, clone, 0.005, 1),
    }


def test_parse_size() -> None:
    assert imagegen.parse_size("2G") == 2 << 30
    assert imagegen.parse_size("512M") == 512 << 20
    assert imagegen.parse_size("64KiB") == 64 << 10
    assert imagegen.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        imagegen.parse_size("lots")


def test_same_seed_same_bytes_other_seed_differs(images: dict, tmp_path: Path) -> None:
    again, other = tmp_path / "again.img", tmp_path / "other.img"
    imagegen.generate_image(again, SIZE, 1)
    imagegen.generate_image(other, SIZE, 2)
    assert _sha256(again) == _sha256(images["base"])
    assert _sha256(other) != _sha256(images["base"])


def test_image_is_sparse_with_about_40_percent_holes(images: dict) -> None:
    base = images["base"]
    assert base.stat().st_size == SIZE
    allocated = _allocated_bytes(base)
    assert 0.50 * SIZE <= allocated <= 0.70 * SIZE
    assert base.stat().st_blocks * 512 <= 0.75 * SIZE


def test_layout_runs_are_variable_and_cover_the_image(images: dict) -> None:
    layout = images["layout"]
    assert layout[0].offset == 0 and layout[-1].end == SIZE
    assert all(a.end == b.offset for a, b in itertools.pairwise(layout))
    lengths = {r.length for r in layout[:-1]}
    assert len(lengths) > len(layout) // 2
    assert all(imagegen.MIN_RUN <= n <= imagegen.MAX_RUN and n % BLOCK == 0 for n in lengths)
    assert any(r.offset % (1 << 20) for r in layout)


def test_compressible_data_compresses_about_3x_and_blocks_are_unique() -> None:
    data = bytes(imagegen.compressible_bytes(1, "base", 0, 8 << 20))
    compressor = zstandard.ZstdCompressor(level=1)
    ratios = [
        len(data[i : i + (1 << 20)]) / len(compressor.compress(data[i : i + (1 << 20)]))
        for i in range(0, len(data), 1 << 20)
    ]
    assert all(2.3 <= r <= 4.0 for r in ratios), ratios
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    assert len(set(blocks)) == len(blocks)


def test_changed_copy_differs_exactly_within_extents(images: dict) -> None:
    extents = images["changed_extents"]
    changed_bytes = sum(length for _, length in extents)
    assert 0.7 * 0.01 * SIZE <= changed_bytes <= 1.3 * 0.01 * SIZE
    assert all(o % BLOCK == 0 and BLOCK <= n <= (1 << 20) and n % BLOCK == 0 for o, n in extents)
    assert extents == sorted(extents)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(extents))

    base, changed = _blocks(images["base"]), _blocks(images["changed"])
    differing = {i for i, (a, b) in enumerate(zip(base, changed, strict=True)) if a != b}
    assert differing == _covered_blocks(extents)


def test_some_changed_extents_land_in_former_holes(images: dict) -> None:
    holes = [r for r in images["layout"] if r.kind is imagegen.Kind.HOLE]
    in_holes = [(o, n) for o, n in images["changed_extents"] if any(h.offset <= o < h.end for h in holes)]
    assert 0 < len(in_holes) < len(images["changed_extents"])


def test_clone_shares_most_bytes_with_base(images: dict) -> None:
    base, clone = _blocks(images["base"]), _blocks(images["clone"])
    same = sum(a == b for a, b in zip(base, clone, strict=True))
    assert same >= 0.99 * len(base)
    assert same < len(base)
    assert {i for i, (a, b) in enumerate(zip(base, clone, strict=True)) if a != b} == _covered_blocks(
        images["clone_extents"]
    )
    assert images["clone_extents"] != images["changed_extents"]


def test_cli_writes_extents_json_next_to_the_copy(tmp_path: Path) -> None:
    out, copy = tmp_path / "b.img", tmp_path / "changed.img"
    assert imagegen.main([str(out), "--size", "8M", "--seed", "3", "--changed-copy", str(copy)]) == 0
    extents = json.loads((tmp_path / "changed.json").read_text())
    assert extents and all(len(e) == 2 for e in extents)
    assert out.stat().st_size == copy.stat().st_size == 8 << 20
