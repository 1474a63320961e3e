"""The writer's policy for chunks an incremental changed in part (format.md §8.1, ADR 0011).

Only the changed bytes of such a chunk are read from the source: the load on the VM's storage follows
what changed, not the chunk size. They become a **layer** on the parent's chunk while its layers stay
few and small, so the work and the bytes stored follow what changed too; parent layers the change
overwrites entirely are left out, so the same blocks written before every backup (a journal, a
database's hot pages) keep one layer. At the bound, the parent's layers and the change **merge** into
one layer of every range they cover, while that stays small: those ranges are read from the source,
around the change, within a budget (engine/backup.merge_source_budget), else the parent's small layers
from the vault; never its chunk. Past that, the chunk is **rebuilt** from the parent's copy and stored
whole.

The bounds keep a restore to at most 5 blob reads and 1.5 chunks of bytes a chunk, and a manifest (and
the memory it takes) bounded by the disk's size whatever the history of writes: each layer lists at
most MAX_RANGES ranges, and at most half of a disk's chunks (or MIN_LAYERED_ROOM) carry layers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from raksha.vault.format.deltas import Layer, covered_ranges, live_layers

MAX_LAYERS = 4
MAX_LAYERED_FRACTION = 2  # layers cover at most 1/2 of the chunk
MAX_RANGES = 64
MAX_LAYERED_SHARE = 2  # at most 1/2 of the chunks carry layers
MIN_LAYERED_ROOM = 64


class Choice(enum.Enum):
    LAYER = "layer"  # a new layer of the changed ranges, on the parent's live layers
    MERGE = "merge"  # one layer of the ranges the parent's live layers and the change cover, in their place
    REBUILD = "rebuild"  # the whole chunk, rebuilt on the parent's copy


def room(chunks: int, layered_kept: int) -> int:
    """How many chunks changed now may carry layers on a disk of ``chunks``, of which ``layered_kept``
    keep the parent's layers untouched."""
    return max(MIN_LAYERED_ROOM, chunks // MAX_LAYERED_SHARE) - layered_kept


def choose(layers: Sequence[Layer], ranges: Sequence[tuple[int, int]], length: int, room_left: int) -> Choice:
    """How a chunk of ``length`` bytes with the parent's ``layers`` stores the change ``ranges`` (less than
    the whole chunk), with ``room_left`` more chunks allowed to carry layers."""
    if room_left <= 0 or len(ranges) > MAX_RANGES:
        return Choice.REBUILD
    live = live_layers(layers, ranges)
    size = sum(n for _, n in ranges)
    if len(live) < MAX_LAYERS and (sum(layer.length for layer in live) + size) * MAX_LAYERED_FRACTION <= length:
        return Choice.LAYER
    merged = covered_ranges(live, ranges) if live else ()
    if merged and len(merged) <= MAX_RANGES and sum(n for _, n in merged) * MAX_LAYERED_FRACTION <= length:
        return Choice.MERGE
    return Choice.REBUILD
