"""RowsByPack: a vault's index rows grouped by pack, a partition at a time, through a temporary file."""

from __future__ import annotations

import random

import pytest

from raksha.vault.format import rows_by_pack
from raksha.vault.format.index import Location
from raksha.vault.format.rows_by_pack import RowsByPack

Row = tuple[bytes, bytes, int, int, int]


def index_rows(packs: int, per_pack: int, seed: int) -> list[Row]:
    """Rows as index objects list them: each pack's chunks together, at increasing offsets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(packs):
        pack_id, offset = rng.randbytes(32), 12
        for _ in range(per_pack):
            stored = rng.randrange(100, 5000)
            rows.append((rng.randbytes(32), pack_id, offset, stored, stored * 3))
            offset += stored
    return rows


def expected_packs(rows: list[Row]) -> dict[bytes, list[tuple[bytes, Location]]]:
    out: dict[bytes, list[tuple[bytes, Location]]] = {}
    for cid, pack_id, offset, stored, raw in sorted(rows, key=lambda r: (r[1], r[2])):
        out.setdefault(pack_id, []).append((cid, Location(pack_id, offset, stored, raw)))
    return out


def test_rows_come_back_by_pack_and_offset_across_partitions_and_spilled_pieces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows_by_pack, "PARTITION", 200)
    monkeypatch.setattr(rows_by_pack, "BUFFER_BYTES", 16 * 80)  # every partition spilled in small pieces
    rows = index_rows(packs=40, per_pack=50, seed=1)
    by_pack = RowsByPack(expected=len(rows), what="test rows")
    shuffled = rows[:]
    random.Random(2).shuffle(shuffled)  # two index objects may list one pack's chunks in any order
    by_pack.add_rows(shuffled[:1500])
    by_pack.add_rows(shuffled[1000:])  # 500 rows listed twice come back once
    assert by_pack._parts._end > 0  # spilled to the temporary file

    got = list(by_pack.packs())
    by_pack.close()

    assert by_pack.rows == 2500 and by_pack.stored_bytes == sum(r[3] for r in shuffled[:1500] + shuffled[1000:])
    assert by_pack._mask + 1 == 16  # 2000 / 200 -> 10, rounded up to a power of two
    assert dict(got) == expected_packs(rows)
    assert len(got) == 40  # each pack once, whole, although its rows were spread over spilled pieces


def test_a_pack_may_list_one_chunk_at_two_offsets() -> None:
    cid, pack_id = b"c" * 32, b"p" * 32
    by_pack = RowsByPack(expected=2, what="test rows")
    by_pack.add_rows([(cid, pack_id, 500, 10, 10), (cid, pack_id, 12, 10, 10), (cid, pack_id, 500, 10, 10)])
    assert list(by_pack.packs()) == [(pack_id, [(cid, Location(pack_id, 12, 10, 10)),
                                                (cid, Location(pack_id, 500, 10, 10))])]


def test_no_rows_no_packs() -> None:
    by_pack = RowsByPack(expected=0, what="test rows")
    assert list(by_pack.packs()) == [] and by_pack.rows == 0
    by_pack.close()
