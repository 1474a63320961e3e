"""The layout of a qcow2 image written directly by a restore (vault/sources/qcow2.py)."""

from __future__ import annotations

import struct

import pytest

from raksha.vault.sources.qcow2 import CLUSTER, COPIED, REFCOUNTS_PER_BLOCK, Qcow2Layout

MIB = 1 << 20


def test_a_disk_without_data_has_only_its_metadata() -> None:
    layout = Qcow2Layout.plan(10 * MIB, MIB, [])

    assert list(layout.l2_tables) == []
    # header, the L1 table, the refcount table and one refcount block
    assert layout.clusters == 4 and layout.data_offset == 4 * CLUSTER
    pieces = dict(layout.metadata())
    assert pieces[0][:8] == b"QFI\xfb\x00\x00\x00\x03"
    assert pieces[layout.l1_offset] == bytes(8)  # one L1 entry, no L2 table
    assert pieces[3 * CLUSTER] == b"\x00\x01" * 4  # each of the 4 clusters counted once


def test_data_chunks_lie_in_disk_order_after_the_metadata() -> None:
    layout = Qcow2Layout.plan(2048 * MIB, MIB, [3, 600, 2047])

    assert list(layout.l2_tables) == [0, 1, 3]  # 512 MiB a table
    assert layout.host_offset(3 * MIB + 5) == layout.data_offset + 5
    assert layout.host_offset(600 * MIB) == layout.data_offset + MIB
    assert layout.host_offset(2047 * MIB + MIB - 1) == layout.data_offset + 3 * MIB - 1
    with pytest.raises(ValueError, match="chunk 4 was planned without data"):
        layout.host_offset(4 * MIB)
    pieces = dict(layout.metadata())
    l1 = struct.unpack(">4Q", pieces[layout.l1_offset])
    assert l1 == (layout.l2_offset | COPIED, (layout.l2_offset + CLUSTER) | COPIED, 0,
                  (layout.l2_offset + 2 * CLUSTER) | COPIED)
    second = struct.unpack(f">{CLUSTER // 8}Q", pieces[layout.l2_offset + CLUSTER])
    first_cluster = (600 - 512) * MIB // CLUSTER
    assert second[first_cluster] == (layout.data_offset + MIB) | COPIED
    assert second[first_cluster + 15] == (layout.data_offset + 2 * MIB - CLUSTER) | COPIED
    assert sum(1 for e in second if e) == 16  # one 1 MiB chunk: 16 clusters


def test_a_partial_last_chunk_gets_only_the_clusters_it_needs() -> None:
    size = 8 * MIB + 3 * CLUSTER + 512
    layout = Qcow2Layout.plan(size, 4 * MIB, [0, 2])

    assert layout.clusters * CLUSTER == layout.data_offset + 4 * MIB + 4 * CLUSTER


def test_the_refcounts_count_the_clusters_that_hold_them() -> None:
    # 4 GiB of data: 65,536 data clusters, so refcounts of three blocks (32,768 a block).
    layout = Qcow2Layout.plan(4096 * MIB, MIB, range(4096))

    assert layout.refcount_blocks == 3 and layout.refcount_table_clusters == 1
    blocks = layout.refcount_blocks
    assert (blocks - 1) * REFCOUNTS_PER_BLOCK < layout.clusters <= blocks * REFCOUNTS_PER_BLOCK
    assert layout.clusters == 1 + 1 + 1 + 3 + 8 + 65536  # header, L1, refcount table and blocks, L2s, data


def test_a_chunk_smaller_than_a_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        Qcow2Layout.plan(MIB, 32 << 10, [0])
