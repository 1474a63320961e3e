"""An incremental's changed extents and chunk sets: the answers of lists and sets, in arrays and bits."""

from __future__ import annotations

import random

from raksha.vault.engine.changes import ChangedExtents, ChunkFlags, ChunkSpans, chunks_touching
from raksha.vault.sources.base import ExtentArray

K = 1024
CHUNK = 64 * K


def test_each_chunk_gets_its_share_of_the_extents_clipped_merged_and_in_order() -> None:
    extents = [(3 * CHUNK - 10, 30), (K, 2 * K), (2 * K, 2 * K), (10 * K, 100), (5 * CHUNK, 10 * CHUNK)]
    changed = ChangedExtents(extents, CHUNK, 8 * CHUNK - 5)  # the disk ends inside chunk 7

    assert changed.ranges(0) == [(K, 3 * K), (10 * K, 100)]  # the two touching extents merged
    assert changed.ranges(1) == [] and changed.ranges(4) == []
    assert changed.ranges(2) == [(CHUNK - 10, 10)] and changed.ranges(3) == [(0, 20)]
    assert changed.ranges(5) == [(0, CHUNK)] and changed.ranges(7) == [(0, CHUNK - 5)]
    assert list(changed.chunks()) == [0, 2, 3, 5, 6, 7]
    assert (changed.count, changed.bytes) == (5, 30 + 2 * K + 2 * K + 100 + 10 * CHUNK)  # as given


def test_ranges_match_a_per_chunk_split_of_random_extents() -> None:
    rng = random.Random(3)
    size = 200 * CHUNK
    extents = [(rng.randrange(size), rng.randrange(1, 3 * CHUNK)) for _ in range(300)]
    changed = ChangedExtents(extents, CHUNK, size)
    expected: dict[int, set[int]] = {}
    for off, n in extents:
        for pos in range(off, min(off + n, size)):
            expected.setdefault(pos // CHUNK, set()).add(pos % CHUNK)
    for i in range(200):
        got = {off + k for off, n in changed.ranges(i) for k in range(n)}
        assert got == expected.get(i, set()), i
    assert set(changed.chunks()) == set(expected)


def test_spans_iterate_again_union_merge_and_clip() -> None:
    spans = chunks_touching([(5 * CHUNK, 10), (0, 2 * CHUNK + 1), (7 * CHUNK - 1, 2)], CHUNK, 8 * CHUNK)
    assert list(spans) == [0, 1, 2, 5, 6, 7] == list(spans) and len(spans) == 6 and spans.spans == 2
    assert 2 in spans and 3 not in spans and 8 not in spans and "2" not in spans

    more = spans.union([4, 3, 9, 3])
    assert list(more) == [0, 1, 2, 3, 4, 5, 6, 7, 9] and more.spans == 2
    merged = spans.merged(ChunkSpans([(3, 3), (20, 30)]))
    assert list(merged) == [0, 1, 2, 3, 5, 6, 7, *range(20, 31)]
    assert list(merged.clipped(6, 22)) == [6, 7, 20, 21] and len(ChunkSpans().clipped(0, 9)) == 0


def test_flags_take_a_bit_a_chunk() -> None:
    flags = ChunkFlags(1 << 20)
    for i in (0, 7, 8, (1 << 20) - 1, 7):
        flags.add(i)
    assert flags.count == 4 and len(flags._bits) == 1 << 17
    assert 7 in flags and 6 not in flags and (1 << 20) - 1 in flags and 1 << 20 not in flags and -1 not in flags


def test_a_dirty_bitmap_s_extents_are_used_as_they_come_and_anything_else_is_merged_first() -> None:
    clean = ExtentArray([(0, 10), (CHUNK, 5), (3 * CHUNK - 2, 4)])
    assert ChangedExtents(clean, CHUNK, 4 * CHUNK)._extents is clean  # in order, apart, inside: no copy
    for messy in ([(CHUNK, 5), (0, 10), (3 * CHUNK - 2, 4)],  # out of order
                  [(0, 10), (10, 5), (CHUNK, 5), (3 * CHUNK - 2, 4)],  # touching
                  [(0, 10), (CHUNK, 5), (3 * CHUNK - 2, 4), (4 * CHUNK - 1, 9)]):  # past the end
        changed = ChangedExtents(ExtentArray(messy), CHUNK, 4 * CHUNK)
        assert changed._extents is not messy
        assert changed.ranges(0) == [(0, 15 if (10, 5) in messy else 10)] and changed.ranges(2) == [(CHUNK - 2, 2)]
        assert changed.ranges(3)[0] == (0, 2)
