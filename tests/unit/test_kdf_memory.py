"""The derivation's memory, mapped and populated before it starts (kdf.reserve): the same keys, in the
reserved map when one is large enough, and nothing left mapped once a command has opened its vault."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from raksha.vault.format import kdf

SALT = b"0123456789abcdef"


def params(memory_kib: int, iterations: int = 2, lanes: int = 2) -> dict[str, object]:
    return {"salt": base64.b64encode(SALT).decode(), "iterations": iterations, "memory_kib": memory_kib,
            "lanes": lanes}


def openssl(passphrase: bytes, memory_kib: int, iterations: int = 2, lanes: int = 2) -> bytes:
    return Argon2id(salt=SALT, length=32, iterations=iterations, lanes=lanes, memory_cost=memory_kib).derive(passphrase)


@pytest.fixture(autouse=True)
def nothing_reserved() -> Iterator[None]:
    kdf.release_reserved()
    yield
    kdf.release_reserved()
    assert not kdf._reserved


def test_a_derivation_runs_in_the_reserved_map_and_gives_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    given: list[int] = []
    allocate = kdf._allocate_in_reserved
    monkeypatch.setattr(kdf, "_allocate", kdf.ffi.callback(
        "int(uint8_t **, size_t)", lambda memory, size: given.append(size) or allocate(memory, size)))
    kdf.reserve(4096)
    assert kdf.derive_argon2(b"pw", params(4096)) == openssl(b"pw", 4096)
    assert given == [4096 * 1024] and not kdf._reserved  # taken, used and unmapped
    assert kdf.derive_argon2(b"pw", params(4096)) == openssl(b"pw", 4096)  # nothing reserved: its own memory
    assert given == [4096 * 1024]


def test_a_derivation_needing_more_than_was_reserved_allocates_its_own() -> None:
    kdf.reserve(1024)
    assert kdf.derive_argon2(b"pw", params(2048)) == openssl(b"pw", 2048)
    assert [len(buf) for buf in kdf._reserved] == [1024 * 1024]  # left for release_reserved


def test_unused_reservations_are_unmapped_even_while_being_populated() -> None:
    kdf.reserve(65536)
    kdf.release_reserved()  # at once: the map is dropped when populated, not kept
    for thread in list(kdf._reserving):
        thread.join()
    assert not kdf._reserved and not kdf._reserving


def test_derivations_in_several_threads_take_one_reservation_each() -> None:
    for _ in range(2):
        kdf.reserve(2048)
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda p=p: keys.append(kdf.derive_argon2(p, params(2048))))
               for p in (b"a", b"b", b"c")]  # two in reserved maps, one in its own memory
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(keys) == sorted(openssl(p, 2048) for p in (b"a", b"b", b"c"))
    assert not kdf._reserved


def test_memory_that_cannot_be_reserved_is_allocated_by_the_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> object:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(kdf.mmap, "mmap", no_memory)
    kdf.reserve(2048)
    assert kdf.derive_argon2(b"pw", params(2048)) == openssl(b"pw", 2048)
    assert not kdf._reserved and not kdf._reserving


@pytest.mark.parametrize("cores", [1, 2, 3, 16])
def test_lanes_run_in_no_more_threads_than_cores_and_give_the_same_key(
        monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(kdf.os, "cpu_count", lambda: cores)
    assert kdf._threads(4) == min(4, cores)
    assert kdf.derive_argon2(b"pw", params(2048, lanes=4)) == openssl(b"pw", 2048, lanes=4)
    kdf.reserve(2048)
    assert kdf.derive_argon2(b"pw", params(2048, lanes=4)) == openssl(b"pw", 2048, lanes=4)
