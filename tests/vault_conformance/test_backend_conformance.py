"""What every vault backend promises, as runnable examples of the Backend protocol.

Each test runs against every backend in conformance_backends.BACKEND_FACTORIES (the ``backend``
fixture; a module, not a conftest.py, so it never shadows tests/conftest.py's helpers).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conformance_backends import backend  # noqa: F401 - the fixture every test here takes

from raksha.domain.errors import AlreadyExists, InvalidInput, NotFound
from raksha.vault.backends.base import Backend, ObjectInfo


def keys(backend: Backend, prefix: str = "") -> set[str]:
    return {info.key for info in backend.list(prefix)}


def stage(backend: Backend, data: bytes, name: str = "staged.part") -> Path:
    path = backend.staging_dir() / name
    path.write_bytes(data)
    return path


# -- put and get ---------------------------------------------------------------


def test_satisfies_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend.url, str) and backend.url


def test_put_then_get_returns_the_same_bytes(backend: Backend) -> None:
    backend.put("data/ab/abcdef", b"hello vault")
    assert backend.get("data/ab/abcdef") == b"hello vault"


def test_put_if_absent_refuses_and_keeps_the_original(backend: Backend) -> None:
    backend.put("snapshots/s1", b"original")
    with pytest.raises(AlreadyExists) as caught:
        backend.put("snapshots/s1", b"impostor")
    assert caught.value.code == "OBJECT_EXISTS"
    assert backend.get("snapshots/s1") == b"original"


def test_overwrite_replaces(backend: Backend) -> None:
    backend.put("config", b"v1")
    backend.put("config", b"version two", overwrite=True)
    assert backend.get("config") == b"version two"
    assert backend.stat("config").size == len(b"version two")


def test_overwrite_creates_when_absent(backend: Backend) -> None:
    backend.put("locks/l1", b"x", overwrite=True)
    assert backend.get("locks/l1") == b"x"


def test_put_file_stores_and_consumes_the_staged_file(backend: Backend) -> None:
    path = stage(backend, b"big pack contents")
    backend.put_file("packs/p1", path)
    assert backend.get("packs/p1") == b"big pack contents"
    assert not path.exists()


def test_put_file_if_absent_refuses_and_keeps_the_original(backend: Backend) -> None:
    backend.put("packs/p1", b"original")
    path = stage(backend, b"impostor")
    with pytest.raises(AlreadyExists):
        backend.put_file("packs/p1", path)
    assert backend.get("packs/p1") == b"original"
    assert not path.exists()  # consumed even though the put was refused


def test_put_file_overwrite_replaces(backend: Backend) -> None:
    backend.put("packs/p1", b"old")
    backend.put_file("packs/p1", stage(backend, b"new"), overwrite=True)
    assert backend.get("packs/p1") == b"new"


def test_get_missing_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound) as caught:
        backend.get("data/ab/missing")
    assert caught.value.code == "OBJECT_NOT_FOUND"
    assert caught.value.details["key"] == "data/ab/missing"
    assert "data/ab/missing" in str(caught.value)


@pytest.mark.parametrize("verb", ["get_range", "stat"])
def test_other_reads_of_missing_raise_object_not_found(backend: Backend, verb: str) -> None:
    with pytest.raises(NotFound) as caught:
        if verb == "get_range":
            backend.get_range("nope", 0, 1)
        else:
            backend.stat("nope")
    assert caught.value.code == "OBJECT_NOT_FOUND"


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.get_range("empty", 0, 10) == b""
    assert backend.stat("empty").size == 0
    assert keys(backend) == {"empty"}


def test_eight_mib_object(backend: Backend) -> None:
    data = os.urandom(8 << 20)
    backend.put("packs/big", data)
    assert backend.get("packs/big") == data
    assert backend.get_range("packs/big", 5 << 20, 4096) == data[5 << 20 : (5 << 20) + 4096]
    assert backend.stat("packs/big").size == 8 << 20


@pytest.mark.parametrize(
    "key", ["snap-2024.01.31_full", "a/b.c/d-e_f", ".hidden", "a..b", "...", "v1.2-rc_3/x.y.z"]
)
def test_keys_with_dots_dashes_underscores(backend: Backend, key: str) -> None:
    backend.put(key, key.encode())
    assert backend.get(key) == key.encode()
    assert keys(backend) == {key}
    assert backend.delete(key)


# -- ranges ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 4, b"0123"),  # from the start
        (3, 4, b"3456"),  # inside
        (6, 4, b"6789"),  # ending exactly at the end
        (8, 4, b"89"),  # running past the end: fewer bytes
        (10, 4, b""),  # starting at the end
        (50, 4, b""),  # starting past the end
        (2, 0, b""),  # zero length
    ],
)
def test_get_range(backend: Backend, offset: int, length: int, expected: bytes) -> None:
    backend.put("obj", b"0123456789")
    assert backend.get_range("obj", offset, length) == expected


def test_negative_range_is_invalid(backend: Backend) -> None:
    backend.put("obj", b"0123456789")
    with pytest.raises(InvalidInput):
        backend.get_range("obj", -1, 4)
    with pytest.raises(InvalidInput):
        backend.get_range("obj", 0, -4)


# -- list ------------------------------------------------------------------------


@pytest.fixture
def populated(backend: Backend) -> Backend:
    for key in [
        "config",
        "index/ab01",
        "index/ab02",
        "index/ac03",
        "data/ab/ab01",
        "data/ab/ab99",
        "data/cd/cd01",
        "snapshots/2024/01/s1",
    ]:
        backend.put(key, key.encode())
    return backend


def test_empty_prefix_lists_everything(populated: Backend) -> None:
    assert keys(populated) == {
        "config",
        "index/ab01",
        "index/ab02",
        "index/ac03",
        "data/ab/ab01",
        "data/ab/ab99",
        "data/cd/cd01",
        "snapshots/2024/01/s1",
    }


def test_list_by_directory_prefix(populated: Backend) -> None:
    assert keys(populated, "index/") == {"index/ab01", "index/ab02", "index/ac03"}
    assert keys(populated, "data/ab/") == {"data/ab/ab01", "data/ab/ab99"}


def test_list_by_prefix_ending_mid_name(populated: Backend) -> None:
    assert keys(populated, "index/ab") == {"index/ab01", "index/ab02"}
    assert keys(populated, "data/a") == {"data/ab/ab01", "data/ab/ab99"}
    assert keys(populated, "data/ab/ab9") == {"data/ab/ab99"}
    assert keys(populated, "ind") == {"index/ab01", "index/ab02", "index/ac03"}
    assert keys(populated, "data") == {"data/ab/ab01", "data/ab/ab99", "data/cd/cd01"}


def test_list_nested_keys(populated: Backend) -> None:
    assert keys(populated, "snapshots/") == {"snapshots/2024/01/s1"}
    assert keys(populated, "snapshots/2024/0") == {"snapshots/2024/01/s1"}


def test_list_a_full_key_as_prefix(populated: Backend) -> None:
    assert keys(populated, "config") == {"config"}
    assert keys(populated, "index/ab01") == {"index/ab01"}


def test_list_prefix_matching_nothing(populated: Backend) -> None:
    assert keys(populated, "zzz") == set()
    assert keys(populated, "index/zz") == set()
    assert keys(populated, "no/such/dir/") == set()
    assert keys(populated, "config/") == set()  # an object is not a directory
    assert keys(populated, "../") == set()  # no valid key starts like this


def test_list_reports_size_and_mtime(backend: Backend) -> None:
    before = time.time()
    backend.put("a/x", b"12345")
    (info,) = backend.list("a/")
    assert info == ObjectInfo("a/x", 5, info.mtime)
    assert before - 2 <= info.mtime <= time.time() + 2  # clocks and timestamps are coarse


def test_staged_partials_are_never_listed(backend: Backend) -> None:
    backend.put("a/x", b"1")
    stage(backend, b"half written", "leftover.partial")
    assert keys(backend) == {"a/x"}
    assert keys(backend, "tmp") == set()


def test_list_is_empty_on_a_new_backend(backend: Backend) -> None:
    assert keys(backend) == set()


# -- delete and stat ---------------------------------------------------------------


def test_delete_returns_whether_it_existed(backend: Backend) -> None:
    backend.put("data/ab/ab01", b"x")
    assert backend.delete("data/ab/ab01") is True
    assert backend.delete("data/ab/ab01") is False
    assert backend.delete("never/was") is False
    with pytest.raises(NotFound):
        backend.get("data/ab/ab01")
    assert keys(backend) == set()


def test_key_can_be_reused_after_delete(backend: Backend) -> None:
    backend.put("data/ab/ab01", b"first")
    backend.delete("data/ab/ab01")
    backend.put("data/ab/ab01", b"second")
    assert backend.get("data/ab/ab01") == b"second"


def test_delete_leaves_siblings(backend: Backend) -> None:
    backend.put("data/ab/ab01", b"1")
    backend.put("data/ab/ab02", b"2")
    backend.delete("data/ab/ab01")
    assert keys(backend) == {"data/ab/ab02"}


def test_stat_size_and_mtime(backend: Backend) -> None:
    before = time.time()
    backend.put("snapshots/s1", b"0123456789")
    info = backend.stat("snapshots/s1")
    assert (info.key, info.size) == ("snapshots/s1", 10)
    assert before - 2 <= info.mtime <= time.time() + 2
    assert info == next(iter(backend.list("snapshots/s1")))


# -- keys --------------------------------------------------------------------------

INVALID_KEYS = ["../x", "/abs", "a//b", "", "a/./b", "a/../b", "a/", ".", "..", "a b", "a\\b", "tmp/x", "tmp"]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_refused_by_every_verb(backend: Backend, key: str) -> None:
    verbs: dict[str, Callable[[], object]] = {
        "put": lambda: backend.put(key, b"x"),
        "put overwrite": lambda: backend.put(key, b"x", overwrite=True),
        "put_file": lambda: backend.put_file(key, stage(backend, b"x")),
        "get": lambda: backend.get(key),
        "get_range": lambda: backend.get_range(key, 0, 1),
        "stat": lambda: backend.stat(key),
        "delete": lambda: backend.delete(key),
    }
    for verb, call in verbs.items():
        with pytest.raises(InvalidInput) as caught:
            call()
        assert caught.value.code == "INVALID_KEY", verb
    assert keys(backend) == set()


# -- concurrency --------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_put_if_absent_has_exactly_one_winner(backend: Backend, round_: int) -> None:
    threads = 8
    start = threading.Barrier(threads)
    winners: list[int] = []
    losers: list[int] = []
    others: list[BaseException] = []

    def race(i: int) -> None:
        data = f"writer {i}".encode() * (1000 * i + 1)  # different sizes, so a torn object would show
        start.wait()
        try:
            backend.put("locks/exclusive", data)
            winners.append(i)
        except AlreadyExists:
            losers.append(i)
        except BaseException as exc:
            others.append(exc)

    workers = [threading.Thread(target=race, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert others == []
    assert len(winners) == 1 and len(losers) == threads - 1
    (i,) = winners
    assert backend.get("locks/exclusive") == f"writer {i}".encode() * (1000 * i + 1)
