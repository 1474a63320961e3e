"""The in-memory chunk index: a compact table that answers as the dict it replaced, and loads in bounded memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from raksha.domain.errors import NotFound
from raksha.vault import repository
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.chunk_table import ChunkLocator, ChunkTable, IdSet
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.index import Location, decode_index, encode_index
from raksha.vault.repository import Vault


def _locations(n: int, packs: int = 7) -> dict[bytes, Location]:
    pack_ids = [os.urandom(32) for _ in range(packs)]
    return {os.urandom(32): Location(pack_ids[i % packs], i * 4096, 1000 + i, 1 << 20) for i in range(n)}


def _table(entries: dict[bytes, Location]) -> ChunkTable:
    table = ChunkTable()
    for cid, loc in entries.items():
        table.add(cid, loc.pack_id, loc.offset, loc.stored_length, loc.raw_length)
    return table


def test_the_table_answers_as_a_dict_through_many_resizes() -> None:
    entries = _locations(5000)
    table = _table(entries)
    assert len(table) == 5000 and table == entries
    assert set(table) == set(entries)
    some = next(iter(entries))
    assert table[some] == entries[some] and some in table
    absent = os.urandom(32)
    assert absent not in table and table.get(absent) is None and "not an id" not in table
    with pytest.raises(KeyError):
        table[absent]


def test_adding_an_id_again_replaces_its_location() -> None:
    cid, first, second = os.urandom(32), os.urandom(32), os.urandom(32)
    table = ChunkTable()
    table.add(cid, first, 0, 10, 20)
    table.add(cid, second, 4096, 11, 21)
    assert len(table) == 1 and table[cid] == Location(second, 4096, 11, 21)


def test_a_chunk_costs_under_70_bytes_where_a_dict_cost_over_300() -> None:
    n = 50_000
    records = decode_index(encode_index(_locations(n, packs=n // 2000), Crypto()), Crypto(), what="index")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = ChunkTable()
        table.update_rows(records.rows())
        table_bytes = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        as_dict = records.entries  # what the index was: the ids, Locations, their pack ids and ints
        dict_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(table) == len(as_dict) == n and table == as_dict
    assert table_bytes / n < 70 < 300 < dict_bytes / n


def test_an_id_set_is_a_set() -> None:
    ids = [os.urandom(32) for _ in range(3000)]
    s = IdSet(ids + ids[:10])
    assert len(s) == 3000 and s == set(ids) and ids[5] in s and os.urandom(32) not in s
    with pytest.raises(ValueError):
        s.add(b"short")
    more = [os.urandom(32) for _ in range(3)]
    with pytest.raises(ValueError):
        s.update([*more[:2], b"short", more[2]])
    s.add(more[2])  # what came before the bad id was added, and the set still works
    assert len(s) == 3003 and s == set(ids + more)


def test_an_id_set_says_which_of_many_ids_it_lacks_at_once() -> None:
    held = [os.urandom(32) for _ in range(5000)]  # past several resizes: probes wrap and collide
    s = IdSet(held)
    absent = [os.urandom(32) for _ in range(500)]
    assert s.missing_of(held[::7] + absent + held[:3]) == set(absent)
    assert s.missing_of([]) == set() and IdSet().missing_of(held[:4]) == set(held[:4])


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(encrypted=False), None)


@pytest.mark.parametrize("hold", [repository.INDEX_HOLD_BYTES, 0], ids=["held", "read-twice"])
def test_the_index_loads_without_superseded_objects_however_much_is_held(
        vault: Vault, hold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "INDEX_HOLD_BYTES", hold)
    old, kept = _locations(300), _locations(200)
    old_id = vault.write_index(old)
    vault.write_index(kept)
    replacement = dict(list(old.items())[:100])  # as gc writes: what it kept of the old one, elsewhere
    vault.write_index(replacement, [bytes.fromhex(old_id)])
    index = vault.load_index()
    assert index.locations == {**kept, **replacement}
    assert len(index.index_ids) == 2 and old_id not in index.index_ids


def test_an_index_object_gone_between_the_two_reads_means_reading_again(
        vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "INDEX_HOLD_BYTES", 0)
    entries = _locations(100)
    vault.write_index(entries)
    real_get, calls = vault.backend.get, []

    def get(key: str) -> bytes:
        calls.append(key)
        if len(calls) == 2:  # the second read of the only index object: a gc took it meanwhile
            raise NotFound(key)
        return real_get(key)

    monkeypatch.setattr(vault.backend, "get", get)
    assert vault.load_index().locations == entries
    assert len(calls) == 4


def test_a_restore_loads_only_the_locations_it_needs(vault: Vault) -> None:
    entries = _locations(500)
    vault.write_index(entries)
    wanted = IdSet([*list(entries)[:7], os.urandom(32)])  # and one the vault does not hold
    index = vault.load_index(only=wanted)
    assert index.locations == {cid: entries[cid] for cid in list(entries)[:7]}


def test_a_locator_fills_in_the_locations_of_the_ids_it_wants_and_adds_none(vault: Vault) -> None:
    entries = _locations(500)
    vault.write_index(dict(list(entries.items())[:300]))
    vault.write_index(dict(list(entries.items())[250:]))  # 50 listed twice: either location is right
    absent = os.urandom(32)
    wanted = ChunkLocator()
    wanted.add_ids([*list(entries)[::5], absent, next(iter(entries))])  # repeats are one row

    index = vault.load_index(locate=wanted)

    assert index.locations is wanted and len(wanted) == 101
    assert list(wanted.unlocated()) == [absent]
    assert wanted.get(absent) is None and absent in wanted  # wanted, not located
    assert all(wanted.get(cid) == entries[cid] for cid in list(entries)[::5])


def test_a_locator_that_loads_again_forgets_what_the_first_attempt_found(vault: Vault) -> None:
    entries = _locations(10)
    wanted = ChunkLocator()
    wanted.add_ids(entries)
    wanted.locate_rows((cid, os.urandom(32), 0, 1, 2) for cid in entries)  # an index since replaced
    vault.write_index(dict(list(entries.items())[:4]))
    vault.load_index(locate=wanted)
    assert {cid: wanted.get(cid) for cid in entries} == {
        cid: (loc if k < 4 else None) for k, (cid, loc) in enumerate(entries.items())}


def test_many_index_objects_are_read_in_parallel_batches_in_order(vault: Vault,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "INDEX_BATCH_BYTES", 2000)  # a few small objects a batch
    objects = [_locations(5) for _ in range(100)]  # more than read one after another
    for entries in objects:
        vault.write_index(entries)
    index = vault.load_index()
    assert len(index.index_ids) == 100
    assert index.locations == {cid: loc for entries in objects for cid, loc in entries.items()}
